"""longctx.planner.estimate / architecture / advice: the per-layer model against the tensors a real Qwen3 layer
saves (measured), and every part of Qwen3-4B's plan at 262,144 tokens against figures computed by hand here.

Qwen3-4B-Instruct-2507 (its config.json): hidden 2,560, 36 layers, 32 query heads and 8 KV heads of head_dim 128
(q width 4,096, k / v width 1,024), MLP 9,728, vocabulary 151,936, tied embeddings. S = 262,144 tokens, bf16
(2 bytes) weights and activations. 1 GiB = 1,073,741,824 bytes.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from longctx.errors import ArchitectureError
from longctx.model.architecture import Architecture, load_architecture
from longctx.model.loading import apply_lora
from longctx.model.tiling import enable_tiled_mlp
from longctx.planner.advice import largest_fitting_tokens
from longctx.planner.estimate import GIB, LORA_MODULES, StepShape, estimate, layer_saved_bytes_per_token
from longctx.settings import LoraArguments
from support.paths import EXP_009

QWEN3_4B = "Qwen/Qwen3-4B-Instruct-2507"
S = 262_144
TINY = {"hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "intermediate_size": 384, "vocab_size": 500}
CHECKPOINTED = "checkpointed layer inputs"
MLP_PHASE = "one layer's recompute (MLP backward)"
ATTENTION_PHASE = "one layer's recompute (attention backward)"
LOGITS = "logits at label positions"

# --- hand figures shared by the tests below ------------------------------------------------------------------------
# bf16 weights: 4,022,468,096 parameters (test_parameters_...) x 2 bytes
WEIGHTS = 8_044_936_192
# LoRA r=16 on the 7 projections, 33,030,144 adapter parameters (test_lora_...), under ZeRO-2 over 4 GPUs:
# bf16 copy 2 B + (fp32 master 4 + fp32 gradient 4 + Adam m 4 + v 4) / 4 GPUs = 6 B per parameter
LORA_ZERO2_OVER_4 = 198_180_864
# one layer input: S x 2,560 x 2 bytes = 1,342,177,280 (1.25 GiB)
LAYER_INPUT = 1_342_177_280
# rotary cos + sin, shared by every layer: 2 x S x 128 x 2 = 134,217,728; the final norm's fp32 input: S x 2,560 x 4
COS_SIN, FINAL_NORM = 134_217_728, 2_684_354_560
# with offload_activations: one layer input in flight + one back for its recompute + cos / sin + final norm
CHECKPOINTED_OFFLOADED = 2 * LAYER_INPUT + COS_SIN + FINAL_NORM                              # 5,502,926,848
# What one decoder layer saves for its backward, bytes per token (b = 2; widths q 4,096, kv 1,024, h 2,560):
#   input norm's fp32 copy 2,560 x 4 = 10,240; q / k norms' fp32 inputs (4,096 + 1,024) x 4 = 20,480;
#   rotated q, k, v (4,096 + 2 x 1,024) x 2 = 12,288; attention output 4,096 x 2 = 8,192;
#   fp32 residual into the post-attention norm 2,560 x 4 = 10,240;
#   fp32 statistics: 32 q-norm rows + 8 k-norm rows + 2 layer norms + 32 softmax lse = 74 x 4 = 296;
#   LoRA with dropout: each adapter its A output (16 x 2) + its dropped input (x 2) + the mask (x 1 on a GPU):
#     q, k, v: 3 x (32 + 2,560 x 3) = 23,136; o: 32 + 4,096 x 3 = 12,320
#   sum 97,192; with tiled_mlp TiledMLP also keeps the MLP input 2,560 x 2 = 5,120 -> 102,312
ATTENTION_SAVED_PER_TOKEN = 97_192
TILED_MLP_INPUT_PER_TOKEN = 5_120
#   MLP half: gate, act(gate), up 3 x 9,728 x 2 = 58,368; LoRA gate / up 2 x (32 + 2,560 x 3) = 15,424;
#   down 32 + 9,728 x 3 = 29,216 -> 103,008
MLP_SAVED_PER_TOKEN = 103_008
#   MLP gradients and buffers: max(backward: 2 x 9,728 x 2 less down's freed dropped copy + mask 9,728 x 3 = 9,728,
#   recompute: the product alive beside down's dropped copy 9,728 x 2 = 19,456) + a kernel buffer 9,728 x 2 = 38,912
MLP_TRANSIENT_PER_TOKEN = 38_912
# flash-attention backward workspace per token: dq, dk, dv (4,096 + 2,048) x 2 = 12,288; incoming d(output)
# 4,096 x 2 = 8,192; fp32 dq accumulator 4,096 x 4 = 16,384; dk, dv expanded to 32 heads 2 x 4,096 x 2 = 16,384
ATTENTION_WORKSPACE_PER_TOKEN = 53_248
CUDA_CONTEXT, NCCL, ZERO_BUCKETS = 1_073_741_824, 536_870_912, 2 * 200_000_000 * 2  # 1 GiB, 0.5 GiB, 2 bf16 buckets


def qwen3_4b_step(**changes) -> StepShape:
    """009's configured step: one 262,144-token sample, bf16, LoRA r=16 / dropout 0.05 on the 7 projections,
    ZeRO-2 over 4 GPUs (200,000,000-element buckets), flash-attention, tiled_mlp + offload_activations."""
    base = StepShape(arch=load_architecture(QWEN3_4B, EXP_009), tokens=S, label_tokens=512, world_size=4,
                     zero_stage=2, reduce_bucket_elements=200_000_000, attention="flash_attention_2",
                     tiled_mlp=True, offload=True)
    return base.replace(**changes)


# --- measured: the per-layer model against a real Qwen3 layer -----------------------------------------------------


def saved_bytes_of_one_layer(dtype, dropout, tiled, targets, seq_len=256) -> int:
    """Bytes of the distinct tensors one LoRA-wrapped decoder layer saves for its backward, without the weights,
    the layer input and the rotary cos / sin (the checkpoint and the model hold those)."""
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TINY, attn_implementation="sdpa", use_cache=False)).to(dtype)
    model = apply_lora(model, LoraArguments(lora_r=8, lora_alpha=16, lora_dropout=dropout,
                                            lora_target_modules=list(targets))).to(dtype)
    model.train()
    if tiled:
        enable_tiled_mlp(model, 64)
    layer = model.base_model.model.model.layers[0]
    x = torch.randn(1, seq_len, TINY["hidden_size"], dtype=dtype, requires_grad=True)
    positions = torch.arange(seq_len)[None]
    cos, sin = model.base_model.model.model.rotary_emb(x, positions)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), x, cos, sin)}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
    return sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("tiled", [False, True], ids=["untiled", "tiled"])
@pytest.mark.parametrize("targets", [("all-linear",), ("q_proj", "v_proj"), ("o_proj", "down_proj")],
                         ids=["all", "qv", "o-down"])
def test_planned_layer_activations_equal_what_a_real_qwen3_layer_saves(dtype, dropout, tiled, targets):
    seq_len = 256
    measured = saved_bytes_of_one_layer(dtype, dropout, tiled, targets, seq_len)
    shape = StepShape(arch=Architecture.from_config(TINY), tokens=seq_len, label_tokens=1,
                      act_bytes=torch.finfo(dtype).bits // 8, lora_r=8, lora_dropout=dropout, tiled_mlp=tiled,
                      tile_tokens=64, device="cpu",
                      lora_targets=LORA_MODULES if targets == ("all-linear",) else targets)
    per_token = layer_saved_bytes_per_token(shape)
    planned = seq_len * (per_token["attention"] + (0 if tiled else per_token["mlp"]))  # tiled: MLP is per tile
    assert planned == pytest.approx(measured, rel=0.01)


# --- Qwen3-4B at 262,144 tokens, by hand ---------------------------------------------------------------------------


def test_shipped_architecture_is_qwen3_4b():
    arch = load_architecture(QWEN3_4B, EXP_009)
    assert arch.source == str(EXP_009 / "model_architecture.json")
    assert (arch.hidden_size, arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads,
            arch.head_dim, arch.intermediate_size, arch.vocab_size, arch.tie_word_embeddings) == (
        2560, 36, 32, 8, 128, 9728, 151936, True)


def test_parameters_and_bf16_weights():
    # embeddings, tied (counted once)        151,936 x 2,560                              =   388,956,160
    # one layer: q_proj, o_proj              2 x 2,560 x 4,096                            =    20,971,520
    #            k_proj, v_proj              2 x 2,560 x 1,024                            =     5,242,880
    #            gate, up, down              3 x 2,560 x 9,728                            =    74,711,040
    #            norms: input, post-attention 2 x 2,560; q_norm, k_norm 2 x 128          =         5,376
    #            layer                                                                    =   100,930,816
    # 36 layers                                                                           = 3,633,509,376
    # final norm                                                                          =         2,560
    # total                                                                               = 4,022,468,096
    arch = load_architecture(QWEN3_4B, EXP_009)
    assert arch.num_parameters() == 4_022_468_096
    weights = estimate(qwen3_4b_step()).part("weights").bytes
    assert weights == WEIGHTS == 4_022_468_096 * 2  # 7.49 GiB (README: 7.5)


@pytest.mark.parametrize("tokens, expected", [
    # 36 x 262,144 x 2,560 x 2 = 48,318,382,080 (45 GiB) + cos / sin 134,217,728 + final norm 2,684,354,560
    (262_144, 51_136_954_368),
    # every term is per token: half the tokens, half of each: 24,159,191,040 + 67,108,864 + 1,342,177,280
    (131_072, 25_568_477_184),
])
def test_checkpointed_layer_inputs(tokens, expected):
    step = qwen3_4b_step(tokens=tokens, offload=False)
    assert estimate(step).part(CHECKPOINTED).bytes == expected


def test_offload_keeps_two_layer_inputs_on_the_gpu():
    # the other 34 go to pinned host memory: tests/test_planner_host.py
    kept, offloaded = estimate(qwen3_4b_step(offload=False)), estimate(qwen3_4b_step())
    assert offloaded.part(CHECKPOINTED).bytes == CHECKPOINTED_OFFLOADED == 5_502_926_848  # 5.125 GiB
    assert kept.part(CHECKPOINTED).bytes - offloaded.part(CHECKPOINTED).bytes == 34 * LAYER_INPUT  # 42.5 GiB


def test_lora_adapters_and_their_optimizer_state():
    # r x (in + out) per projection, r = 16:
    #   q_proj 16 x (2,560 + 4,096) = 106,496      o_proj 16 x (4,096 + 2,560) = 106,496
    #   k_proj 16 x (2,560 + 1,024) =  57,344      v_proj                       =  57,344
    #   gate_proj, up_proj 16 x (2,560 + 9,728) = 196,608 each; down_proj 16 x (9,728 + 2,560) = 196,608
    #   layer 917,504 x 36 layers = 33,030,144 adapter parameters
    zero2 = estimate(qwen3_4b_step()).part("LoRA + optimizer").bytes
    assert zero2 == LORA_ZERO2_OVER_4 == 33_030_144 * 6  # bf16 copy 2 B + 16 B of fp32 state / 4 GPUs
    # without DeepSpeed, one GPU: PEFT keeps the adapters in fp32: weight 4 + gradient 4 + Adam m, v 8 = 16 B
    alone = estimate(qwen3_4b_step(zero_stage=0, world_size=1, lora_params_fp32=True)).part("LoRA + optimizer")
    assert alone.bytes == 33_030_144 * 16 == 528_482_304


def test_logits_only_at_the_label_positions():
    # the loss casts the bf16 logits to fp32; cross-entropy's backward holds the fp32 log-softmax (4 B), its
    # gradient (4 B), the logits' fp32 gradient (4 B) and that gradient cast back to bf16 (2 B): 14 B per entry
    # 512 positions x 151,936 x 14 = 1,089,077,248 bytes (1.01 GiB)
    assert estimate(qwen3_4b_step()).part(LOGITS).bytes == 1_089_077_248
    # logits at every position, bf16 alone: 262,144 x 151,936 x 2 = 79,658,221,568 bytes = 74.19 GiB (README: 74)
    every_position = estimate(qwen3_4b_step(label_tokens=S)).part(LOGITS).bytes
    assert every_position == 262_144 * 151_936 * 14 and every_position > 79_658_221_568


def test_009_configured_peak_is_the_sum_of_the_parts():
    plan = estimate(qwen3_4b_step())
    attention_saved = (ATTENTION_SAVED_PER_TOKEN + TILED_MLP_INPUT_PER_TOKEN) * S      # 26,820,476,928 (24.98 GiB)
    # attention backward: saved + workspace 53,248 x S = 13,958,643,712 (13 GiB) + d(hidden) from the layer above
    attention_phase = attention_saved + ATTENTION_WORKSPACE_PER_TOKEN * S + LAYER_INPUT   # 42,121,297,920
    # MLP backward: saved + one 8,192-token tile's MLP tensors (103,008 x 8,192 = 843,841,536) and gradients
    # (38,912 x 8,192 = 318,767,104) + TiledMLP's d(input) for the whole sequence (1,342,177,280)
    mlp_phase = attention_saved + (MLP_SAVED_PER_TOKEN + MLP_TRANSIENT_PER_TOKEN) * 8192 + LAYER_INPUT
    assert attention_phase == 42_121_297_920 and mlp_phase == 29_325_262_848
    assert plan.part(ATTENTION_PHASE).bytes == attention_phase
    assert plan.part(MLP_PHASE).bytes == mlp_phase
    assert plan.peak_phase.name == ATTENTION_PHASE  # 39.23 GiB > 27.31 GiB (MLP) > 1.01 GiB (logits)
    # framework: CUDA context + NCCL + ZeRO buckets + 5% of the activations at the peak
    # (5,502,926,848 + 42,121,297,920 = 47,624,224,768 -> 2,381,211,238.4)
    framework = CUDA_CONTEXT + NCCL + ZERO_BUCKETS + 0.05 * (CHECKPOINTED_OFFLOADED + attention_phase)
    assert plan.part("framework").bytes == pytest.approx(framework) and framework == pytest.approx(4_791_823_974.4)
    # peak = 8,044,936,192 + 198,180,864 + 4,791,823,974.4 + 5,502,926,848 + 42,121,297,920 = 60,659,165,798.4
    peak = WEIGHTS + LORA_ZERO2_OVER_4 + framework + CHECKPOINTED_OFFLOADED + attention_phase
    assert peak == pytest.approx(60_659_165_798.4)
    assert plan.peak_bytes == pytest.approx(peak)
    assert f"{peak / GIB:.2f}" == "56.49" and f"{peak / GIB:.1f}" == "56.5"  # the README's 56.5 GiB


def test_tiled_mlp_shrinks_one_layers_mlp_recompute_from_58_to_27_gib():
    # untiled (no TiledMLP input kept): the attention half 97,192 + the whole MLP half 103,008 + its gradients
    # and buffers 38,912 = 239,112 bytes per token x 262,144 = 62,681,776,128 (58.38 GiB; config.yaml: 58)
    untiled = estimate(qwen3_4b_step(tiled_mlp=False)).part(MLP_PHASE).bytes
    assert untiled == (ATTENTION_SAVED_PER_TOKEN + MLP_SAVED_PER_TOKEN + MLP_TRANSIENT_PER_TOKEN) * S
    assert untiled == 62_681_776_128
    # tiled: 29,325,262,848 (27.31 GiB; config.yaml: 27), computed in test_009_configured_peak_is_the_sum_of_the_parts
    assert estimate(qwen3_4b_step()).part(MLP_PHASE).bytes == 29_325_262_848


def test_without_either_switch_the_peak_is_121_gib_and_164864_tokens_fit_80_gib():
    neither = qwen3_4b_step(tiled_mlp=False, offload=False)
    # held activations: all 36 inputs + cos / sin + final norm = 51,136,954,368 = 195,072 bytes per token;
    # the MLP phase 62,681,776,128 (239,112 per token) beats the attention phase (97,192 + 53,248 + 5,120 = 155,560)
    # framework: 1 GiB + 0.5 GiB + 800,000,000 + 5% x (51,136,954,368 + 62,681,776,128 = 113,818,730,496)
    #   = 1,073,741,824 + 536,870,912 + 800,000,000 + 5,690,936,524.8 = 8,101,549,260.8
    # peak: 8,044,936,192 + 198,180,864 + 8,101,549,260.8 + 51,136,954,368 + 62,681,776,128 = 130,163,396,812.8
    assert estimate(neither).peak_bytes == pytest.approx(130_163_396_812.8)  # 121.22 GiB
    # Longest fitting length in 80 GiB = 85,899,345,920 bytes: the fixed parts are 8,044,936,192 + 198,180,864
    # + 1,610,612,736 (context + NCCL) + 800,000,000 = 10,653,729,792; every token costs 1.05 x (195,072 +
    # 239,112) = 455,893.2 bytes, so (85,899,345,920 - 10,653,729,792) / 455,893.2 = 165,051.0 tokens: 161 steps of
    # 1,024 = 164,864 (162 x 1,024 = 165,888 is too many)
    assert largest_fitting_tokens(neither, 80.0) == 164_864


# --- architecture sources -----------------------------------------------------------------------------------------


def test_a_local_model_directory_config_json_wins(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "tie_word_embeddings": True}))
    arch = load_architecture(str(tmp_path), EXP_009)
    assert arch.hidden_size == 128 and arch.source == str(tmp_path / "config.json")


def test_an_unknown_model_or_an_incomplete_config_says_what_to_provide(tmp_path):
    with pytest.raises(ArchitectureError, match="add model_architecture.json"):
        load_architecture("nobody/not-a-model", tmp_path)
    with pytest.raises(ArchitectureError, match="add model_architecture.json"):  # the shipped one is another model
        load_architecture("nobody/not-a-model", EXP_009)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in TINY.items() if k != "vocab_size"}))
    with pytest.raises(ArchitectureError, match="model config has no 'vocab_size'"):
        load_architecture(str(tmp_path))


# --- sequence parallelism: each GPU holds S / sequence_parallel_size tokens, + Ulysses' all-to-all buffers ---------


def test_ulysses_all_to_all_buffers():
    # q, k, v and the attention output, send + receive: 2 x (4,096 + 2 x 1,024 + 4,096) x tokens per GPU x 2 bytes
    # 010: 262,144 / 4 = 65,536 tokens per GPU -> 2 x 10,240 x 65,536 x 2 = 2,684,354,560 bytes (2.5 GiB)
    from longctx.planner.estimate import all_to_all_bytes

    assert all_to_all_bytes(qwen3_4b_step(tokens=65_536, sp_size=4)) == 2_684_354_560
    assert all_to_all_bytes(qwen3_4b_step(tokens=65_536)) == 0  # no SP: no exchange


def test_010_peak_per_gpu_is_the_sum_of_the_parts():
    # 010: SP 4 on 4 GPUs, 65,536 tokens per GPU, no tiled_mlp, no offload, ZeRO-2 over all 4 GPUs
    plan = estimate(qwen3_4b_step(tokens=65_536, sp_size=4, tiled_mlp=False, offload=False))
    # 36 x 65,536 x 2,560 x 2 = 12,079,595,520 + cos / sin 2 x 65,536 x 128 x 2 = 33,554,432 + final norm
    # 65,536 x 2,560 x 4 = 671,088,640
    assert plan.part(CHECKPOINTED).bytes == 12_784_238_592  # 11.91 GiB
    # MLP backward, untiled: (97,192 + 103,008 + 38,912) x 65,536 = 239,112 x 65,536
    assert plan.part(MLP_PHASE).bytes == 15_670_444_032  # 14.59 GiB: the peak phase
    # attention backward: (97,192 + 53,248) x 65,536 + d(hidden) 65,536 x 5,120 + all-to-all 2,684,354,560
    assert plan.part(ATTENTION_PHASE).bytes == 9_859_235_840 + 335_544_320 + 2_684_354_560  # 11.99 GiB
    assert plan.peak_phase.name == MLP_PHASE
    # framework: 1 GiB + 0.5 GiB + 800,000,000 + 5% x (12,784,238,592 + 15,670,444,032) = 3,833,346,867.2
    # peak: 8,044,936,192 + 198,180,864 + 3,833,346,867.2 + 12,784,238,592 + 15,670,444,032 = 40,531,146,547.2
    assert plan.peak_bytes == pytest.approx(40_531_146_547.2)
    assert f"{plan.peak_bytes / GIB:.2f}" == "37.75"  # 010's config.yaml and the README


def test_011_peak_per_gpu_is_the_sum_of_the_parts():
    # 011: 1,048,576 tokens, SP 8 on 8 GPUs: 131,072 tokens per GPU, tiled_mlp (8,192-token tiles), no offload
    plan = estimate(qwen3_4b_step(tokens=131_072, sp_size=8, world_size=8, offload=False))
    assert plan.part(CHECKPOINTED).bytes == 25_568_477_184  # test_checkpointed_layer_inputs at 131,072 tokens
    # LoRA: bf16 copy 2 B + 16 B of fp32 state / 8 GPUs = 4 B per parameter: 33,030,144 x 4
    assert plan.part("LoRA + optimizer").bytes == 132_120_576
    # attention backward: (97,192 + 5,120 + 53,248) x 131,072 = 20,389,560,320, + d(hidden) 671,088,640, +
    # all-to-all 2 x 10,240 x 131,072 x 2 = 5,368,709,120
    assert plan.part(ATTENTION_PHASE).bytes == 26_429_358_080  # 24.61 GiB: the peak phase
    # MLP backward, tiled: 102,312 x 131,072 + (103,008 + 38,912) x 8,192 + TiledMLP's d(input) 671,088,640
    assert plan.part(MLP_PHASE).bytes == 13_410_238_464 + 1_162_608_640 + 671_088_640  # 14.20 GiB
    # framework: 1,610,612,736 + 800,000,000 + 5% x (25,568,477,184 + 26,429,358,080) = 5,010,504,499.2
    # peak: 8,044,936,192 + 132,120,576 + 5,010,504,499.2 + 25,568,477,184 + 26,429,358,080 = 65,185,396,531.2
    assert plan.peak_bytes == pytest.approx(65_185_396_531.2)
    assert f"{plan.peak_bytes / GIB:.2f}" == "60.71"  # 011's config.yaml and the README


@pytest.mark.parametrize("conf,planned", [("", True), ("pinned_max_cached_size_mb:64,expandable_segments:True", True),
                                          ("expandable_segments:False", False)])
def test_the_plan_says_when_the_allocator_runs_without_expandable_segments(monkeypatch, conf, planned):
    """The 5% slack holds with expandable segments (the launchers set them); switched off, the plan says the
    fragmentation across sample lengths is not planned."""
    from longctx.planner.estimate import expandable_segments

    monkeypatch.setenv("PYTORCH_ALLOC_CONF", conf)
    assert expandable_segments() is planned
    note = estimate(qwen3_4b_step()).part("framework").note
    assert note.endswith("allocator slack 5%") is planned
    assert ("(expandable segments OFF: fragmentation across sample lengths is not planned)" in note) is not planned
