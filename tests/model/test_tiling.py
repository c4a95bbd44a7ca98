"""longctx.model.tiling and longctx.model.offload: the tiled-MLP and activation-offload switches give the untiled,
non-offloaded model's loss and LoRA gradients; their mapping onto transformers / DeepSpeed
(longctx.model.loading.apply_memory_switches); and their validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, TrainingArguments

from longctx.config import validate_memory
from longctx.errors import ConfigError
from longctx.model import offload, tiling
from longctx.model.loading import apply_lora, apply_memory_switches
from longctx.model.loss import summary_loss
from longctx.model.offload import offload_checkpointing_kwargs
from longctx.model.tiling import disable_tiled_mlp, enable_tiled_mlp, tile_count
from longctx.settings import LoraArguments, MemoryArguments

SEQ_LEN = 96
TILE_TOKENS = 16  # 96 tokens x batch 2 -> 12 tiles: tiling is really exercised


def tiny_lora_qwen3(dropout: float = 0.0, dtype: torch.dtype = torch.float32, layers: int = 2):
    """A random Qwen3 with LoRA on all seven projections; lora_B non-zero so every adapter gets a gradient."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_cache=False,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    model = apply_lora(Qwen3ForCausalLM(config).to(dtype),
                       LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=dropout, lora_target_modules=["all-linear"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    return model


def summary_batch(batch_size: int = 2, seq_len: int = SEQ_LEN) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (batch_size, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : seq_len - 24] = -100  # the last 24 tokens are the summary
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_lora_grads(model, batch, seed: int = 3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, _ = summary_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(result_a, result_b, atol: float = 1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = result_a, result_b
    assert torch.allclose(loss_a, loss_b, atol=atol, rtol=0), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    for name in grads_a:
        assert grads_a[name].abs().max() > 0, f"{name} got no gradient"
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol, rtol=0), name


# --- tiled MLP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "non-reentrant-checkpointing"])
def test_tiled_mlp_gives_the_untiled_loss_and_lora_gradients(checkpointing):
    batch = summary_batch()
    results = []
    for tiled in (False, True):
        model = tiny_lora_qwen3()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if tiled:
            assert enable_tiled_mlp(model, TILE_TOKENS) == 2
        results.append(loss_and_lora_grads(model, batch))
    assert_same(*results)


def test_tiled_mlp_really_runs_deepspeeds_tiledmlp_in_tiles(monkeypatch):
    from deepspeed.runtime.sequence_parallel import ulysses_sp

    calls = []
    real_apply = ulysses_sp.TiledMLP.apply
    monkeypatch.setattr(ulysses_sp.TiledMLP, "apply",
                        lambda fn, mlp, x, shards, params: calls.append((tuple(x.shape), shards, len(params)))
                        or real_apply(fn, mlp, x, shards, params))
    model = tiny_lora_qwen3()
    enable_tiled_mlp(model, TILE_TOKENS)
    loss_and_lora_grads(model, summary_batch())
    # per layer: the 2 x 96 tokens flattened into one axis, 12 tiles, LoRA A + B of gate/up/down as compute params
    assert calls == [((2 * SEQ_LEN, 64), 12, 6)] * 2


def test_tiled_mlp_with_lora_dropout_backpropagates_the_masks_it_used():
    """TiledMLP recomputes each tile in the backward; the tile's random state is replayed, so LoRA dropout draws the
    mask the forward used. Reference: the same tiles through plain autograd from the same seed (float64, exact)."""
    model = tiny_lora_qwen3(dropout=0.3, dtype=torch.float64, layers=1)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 50, 64, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 50, 64, dtype=torch.float64)
    trainable = [p for p in mlp.parameters() if p.requires_grad]

    def grads():  # TiledMLP accumulates the weights' gradients into .grad in its backward, not through the graph
        out = [x.grad.clone(), *(p.grad.clone() for p in trainable)]
        x.grad = None
        model.zero_grad(set_to_none=True)
        return out

    enable_tiled_mlp(model, TILE_TOKENS)
    torch.manual_seed(7)
    tiled_out = mlp(x)
    (tiled_out * weight).sum().backward()
    tiled_grads = grads()

    disable_tiled_mlp(model)
    torch.manual_seed(7)
    tiles = x.reshape(-1, 64).chunk(tile_count(50, TILE_TOKENS))
    reference_out = torch.cat([type(mlp).forward(mlp, tile) for tile in tiles]).view(1, 50, 64)
    (reference_out * weight).sum().backward()
    reference_grads = grads()

    assert torch.equal(tiled_out, reference_out)
    for tiled, reference in zip(tiled_grads, reference_grads):
        assert torch.allclose(tiled, reference, atol=1e-12, rtol=0)


def test_tiled_mlp_with_dropout_under_checkpointing_matches_tiled_without_checkpointing():
    """The checkpoint replays the layer's random state in its recompute, TiledMLP's tiles replay theirs: with LoRA
    dropout on, the checkpointed tiled step is the plain tiled step."""
    batch = summary_batch()
    results = []
    for checkpointing in (False, True):
        model = tiny_lora_qwen3(dropout=0.2)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        enable_tiled_mlp(model, TILE_TOKENS)
        results.append(loss_and_lora_grads(model, batch))
    assert_same(*results)


def test_tiled_mlp_without_grad_computes_tile_by_tile_and_matches():
    model = tiny_lora_qwen3()
    batch = summary_batch()
    model.eval()
    with torch.no_grad():
        untiled = model(input_ids=batch["input_ids"]).logits
        enable_tiled_mlp(model, TILE_TOKENS)
        tiled = model(input_ids=batch["input_ids"]).logits
    assert torch.allclose(untiled, tiled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seq_len,tile_tokens", [(s, t) for s in (1, 5, 15, 16, 17, 31, 33, 100, 257, 4099)
                                                  for t in (1, 3, 16, 1000)] + [(262144, 8192), (262143, 8192)])
def test_tile_count_is_what_torch_chunk_returns_and_respects_the_tile_length(seq_len, tile_tokens):
    tiles = tile_count(seq_len, tile_tokens)
    chunks = torch.empty(seq_len).chunk(tiles)
    assert len(chunks) == tiles  # TiledMLP releases the gradients to ZeRO at the last tile index
    assert max(len(c) for c in chunks) <= tile_tokens
    assert tiles == -(-seq_len // tile_tokens)


def test_enable_tiled_mlp_refuses_a_model_without_gated_mlp():
    with pytest.raises(ValueError, match="tiled_mlp"):
        enable_tiled_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4)), 16)


def test_disable_tiled_mlp_restores_the_class_forward():
    model = tiny_lora_qwen3()
    mlp = model.base_model.model.model.layers[0].mlp
    enable_tiled_mlp(model, TILE_TOKENS)
    assert "forward" in vars(mlp)
    assert disable_tiled_mlp(model) == 2
    assert "forward" not in vars(mlp)


# --- activation offload ------------------------------------------------------------------------------------------


def test_offload_kwargs_merge_into_the_existing_checkpointing_kwargs():
    assert offload_checkpointing_kwargs({"use_reentrant": False}) == {"use_reentrant": False, "offload": True}
    assert offload_checkpointing_kwargs(None) == {"use_reentrant": False, "offload": True}
    assert offload_checkpointing_kwargs('{"use_reentrant": false, "every_n_layers": 2}') == {
        "use_reentrant": False, "every_n_layers": 2, "offload": True}


def training_args(tmp_path, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", activation_checkpointing=True,
                             activation_checkpointing_kwargs={"use_reentrant": False}, **kwargs)


def test_apply_memory_switches_maps_offload_onto_transformers_kwargs_with_an_accelerator(tmp_path, monkeypatch):
    monkeypatch.setattr(offload, "has_accelerator", lambda: True)
    args = training_args(tmp_path)
    lines = apply_memory_switches(tiny_lora_qwen3(), MemoryArguments(offload_activations=True), args)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False, "offload": True}
    assert any(line.startswith("activation offload: on") for line in lines)


def test_apply_memory_switches_leaves_offload_off_without_an_accelerator(tmp_path, monkeypatch):
    """save_on_cpu(pin_memory=True) cannot pin without an accelerator, and on a CPU there is nothing to move."""
    monkeypatch.setattr(offload, "has_accelerator", lambda: False)
    args = training_args(tmp_path)
    model = tiny_lora_qwen3()
    lines = apply_memory_switches(model, MemoryArguments(tiled_mlp=True, tiled_mlp_tile_tokens=32,
                                                         offload_activations=True), args)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert "not applicable" in lines[1]
    assert lines[0].startswith("tiled MLP: on (2 layers, tiles of 32 tokens")
    assert all("forward" in vars(m) for m in tiling.gated_mlps(model))


def test_offloaded_checkpointing_gives_the_same_loss_and_gradients(monkeypatch):
    """transformers' own offload path (activation_checkpointing_enable(offload=True): save_on_cpu around each
    checkpointed layer), with its pinning turned off because this machine has no accelerator to pin for."""
    import transformers.modeling_utils

    packed = []
    real_save_on_cpu = transformers.modeling_utils.save_on_cpu

    def unpinned_counting(pin_memory=False, device_type="cuda"):
        hooks = real_save_on_cpu(pin_memory=False, device_type="cpu")
        real_pack = hooks.pack_hook

        def pack(tensor):
            packed.append(tensor.numel() * tensor.element_size())
            return real_pack(tensor)

        hooks.pack_hook = pack
        return hooks

    monkeypatch.setattr(transformers.modeling_utils, "save_on_cpu", unpinned_counting)
    batch = summary_batch()
    results = []
    for offloaded in (False, True):
        model = tiny_lora_qwen3(dropout=0.1)  # dropout: the recompute must replay the forward's masks either way
        kwargs = offload_checkpointing_kwargs({"use_reentrant": False}) if offloaded else {"use_reentrant": False}
        offload_flag = kwargs.pop("offload", False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload_flag)
        results.append(loss_and_lora_grads(model, batch))
    assert_same(*results)
    # what went to the host: each layer's checkpointed input, batch x tokens x hidden in fp32
    assert [n for n in packed if n] == [2 * SEQ_LEN * 64 * 4] * 2


# --- validation -------------------------------------------------------------------------------------------------


def test_validate_memory_accepts_the_switches_with_checkpointing(tmp_path):
    validate_memory(MemoryArguments(tiled_mlp=True, offload_activations=True), training_args(tmp_path))


def test_validate_memory_offload_needs_activation_checkpointing(tmp_path):
    args = dataclasses.replace(training_args(tmp_path), activation_checkpointing=False)
    with pytest.raises(ConfigError, match="offload_activations.*activation_checkpointing: true"):
        validate_memory(MemoryArguments(offload_activations=True), args)


def test_validate_memory_one_name_for_offload(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", activation_checkpointing=True,
                             activation_checkpointing_kwargs={"use_reentrant": False, "offload": True})
    with pytest.raises(ConfigError, match="offload_activations"):
        validate_memory(MemoryArguments(), args)


def test_validate_memory_tile_tokens_positive(tmp_path):
    with pytest.raises(ConfigError, match="tiled_mlp_tile_tokens"):
        validate_memory(MemoryArguments(tiled_mlp=True, tiled_mlp_tile_tokens=0), training_args(tmp_path))


def test_validate_memory_refuses_tiled_mlp_under_multi_process_ddp(tmp_path, monkeypatch):
    """DDP marks a parameter ready once per backward; TiledMLP's per-tile backward would mark it once per tile."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(ConfigError, match="tiled_mlp.*DeepSpeed"):
        validate_memory(MemoryArguments(tiled_mlp=True), training_args(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    validate_memory(MemoryArguments(tiled_mlp=True), training_args(tmp_path))
