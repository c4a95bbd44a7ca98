"""longctx.memory: the planner's per-layer model against the tensors a real Qwen3 layer saves, the architecture
sources, the 009 plan with and without the switches, and the launcher's PLAN knob."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from conftest import REPO_ROOT, subprocess_env
from longctx import memory
from longctx.config import LoraArguments
from longctx.memory import (GIB, LORA_MODULES, Architecture, PlanError, Setup, estimate, layer_saved_bytes_per_token,
                            load_architecture)
from longctx.modeling import apply_lora
from longctx.tiling import enable_tiled_mlp

EXP_009 = REPO_ROOT / "experiments" / "009_text_summary"
CONFIG_009 = EXP_009 / "config.yaml"
QWEN3_4B = "Qwen/Qwen3-4B-Instruct-2507"
TINY = {"hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "intermediate_size": 384, "vocab_size": 500}


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
    setup = Setup(arch=Architecture.from_config(TINY), tokens=seq_len, label_tokens=1,
                  act_bytes=torch.finfo(dtype).bits // 8, lora_r=8, lora_dropout=dropout, tiled_mlp=tiled,
                  tile_tokens=64, device="cpu",
                  lora_targets=LORA_MODULES if targets == ("all-linear",) else targets)
    per_token = layer_saved_bytes_per_token(setup)
    planned = seq_len * (per_token["attention"] + (0 if tiled else per_token["mlp"]))  # tiled: MLP is per tile
    assert planned == pytest.approx(measured, rel=0.01)


# --- architecture ---------------------------------------------------------------------------------------------


def test_shipped_architecture_gives_the_issues_qwen3_4b_figures():
    arch = load_architecture(QWEN3_4B, EXP_009)
    assert arch.source.endswith("model_architecture.json")
    assert (arch.hidden_size, arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads,
            arch.head_dim, arch.intermediate_size, arch.vocab_size, arch.tie_word_embeddings) == (
        2560, 36, 32, 8, 128, 9728, 151936, True)
    assert arch.num_parameters() / 1e9 == pytest.approx(4.02, abs=0.01)
    plan = estimate(Setup(arch=arch, tokens=262144, label_tokens=512))
    assert plan.part("weights").bytes / GIB == pytest.approx(7.5, abs=0.05)  # bf16 weights
    layer_inputs = 36 * 262144 * 2560 * 2
    assert layer_inputs / GIB == 45  # 36 x 1.25 GiB
    assert plan.part("checkpointed layer inputs").bytes >= layer_inputs
    full_logits = estimate(Setup(arch=arch, tokens=262144, label_tokens=262144)).part("logits at label positions")
    assert full_logits.bytes > 74 * GIB  # what logits at every position would need


def test_a_local_model_directory_config_json_wins(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "tie_word_embeddings": True}))
    arch = load_architecture(str(tmp_path), EXP_009)
    assert arch.hidden_size == 128 and arch.source == str(tmp_path / "config.json")


def test_an_unknown_hub_id_says_what_to_provide(tmp_path):
    with pytest.raises(PlanError, match="model_architecture.json"):
        load_architecture("nobody/not-a-model", tmp_path)
    with pytest.raises(PlanError, match="model_architecture.json"):  # the shipped file describes another model
        load_architecture("nobody/not-a-model", EXP_009)


# --- what the switches do to the plan -------------------------------------------------------------------------


def qwen3_4b_setup(**changes) -> Setup:
    base = Setup(arch=load_architecture(QWEN3_4B, EXP_009), tokens=262144, label_tokens=512, world_size=4,
                 zero_stage=2, reduce_bucket_elements=200_000_000, attention="flash_attention_2")
    return base.replace(**changes)


def test_tiled_mlp_shrinks_the_mlp_recompute_to_one_tile():
    untiled, tiled = estimate(qwen3_4b_setup()), estimate(qwen3_4b_setup(tiled_mlp=True))
    mlp_phase = "one layer's recompute (MLP backward)"
    # the issue: one layer's untiled MLP recompute is 35-45 GiB at this length; tiled, one 8192-token tile of it
    assert untiled.part(mlp_phase).bytes - tiled.part(mlp_phase).bytes > 30 * GIB
    assert tiled.peak_bytes < untiled.peak_bytes


def test_offload_moves_the_checkpointed_inputs_to_host_memory():
    kept, offloaded = estimate(qwen3_4b_setup()), estimate(qwen3_4b_setup(offload=True))
    name = "checkpointed layer inputs"
    assert kept.part(name).bytes - offloaded.part(name).bytes > 40 * GIB
    assert offloaded.host_bytes == 36 * 262144 * 2560 * 2
    assert kept.host_bytes == 0


def test_checkpointed_inputs_grow_linearly_with_tokens():
    name = "checkpointed layer inputs"
    one, two = (estimate(qwen3_4b_setup(tokens=n)).part(name).bytes for n in (65536, 131072))
    assert two == pytest.approx(2 * one)


# --- the command line and the launcher --------------------------------------------------------------------------


def test_009_plan_fits_80_gib_with_the_configured_switches(capsys):
    assert memory.main(["--config", str(CONFIG_009)]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "LoRA + optimizer", "framework", "checkpointed layer inputs", "logits at label positions",
                 "one layer's recompute (MLP backward)", "one layer's recompute (attention backward)",
                 "estimated peak"):
        assert part in out
    assert "tiled_mlp=true" in out and "offload_activations=true" in out
    assert "fits in 80 GiB" in out and "model_architecture.json" in out


def test_009_plan_without_switches_does_not_fit_and_names_the_fix(capsys):
    code = memory.main(["--config", str(CONFIG_009), "--tiled_mlp", "false", "--offload_activations", "false",
                        "--learning_rate", "5e-5"])  # training-only flags are accepted and ignored
    out = capsys.readouterr().out
    assert code == memory.EXIT_DOES_NOT_FIT
    assert "DOES NOT FIT in 80 GiB" in out
    assert "--tiled_mlp true --offload_activations true" in out
    assert "--max_seq_length" in out


def test_plan_for_a_cpu_run_is_not_applicable(capsys):
    assert memory.main(["--config", str(CONFIG_009), "--device", "cpu", "--tiled_mlp", "false"]) == 0
    assert "not applicable" in capsys.readouterr().out


def test_plan_rejects_an_unknown_flag(capsys):
    assert memory.main(["--config", str(CONFIG_009), "--tiled_mpl", "true"]) == memory.EXIT_BAD_CONFIG
    assert "--tiled_mpl" in capsys.readouterr().err


def fake_gpu_path(tmp_path, memory_mib: int = 81559) -> str:
    """A stand-in nvidia-smi reporting one GPU of this size, so the launcher plans (and checks) for a GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncase \"$*\" in *memory.total*) echo {memory_mib};; *index*) echo 0;; esac\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def launch_009(tmp_path, *flags, **env):
    return subprocess.run(["bash", str(EXP_009 / "launch_train.sh"), *flags], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180, env=subprocess_env(OUTPUT_DIR=str(tmp_path / "run"), **env))


def test_launcher_plan_1_prints_the_plan_and_exits_0_without_a_gpu(tmp_path):
    result = launch_009(tmp_path, PLAN="1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "estimated peak" in result.stdout and "fits in 80 GiB" in result.stdout
    assert "accelerate launch" not in result.stdout
    result = launch_009(tmp_path, "--tiled_mlp", "false", "--offload_activations", "false", PLAN="1")
    assert result.returncode == 0 and "DOES NOT FIT" in result.stdout


def test_launcher_stops_with_3_when_the_plan_does_not_fit_unless_overridden(tmp_path):
    path = fake_gpu_path(tmp_path)
    no_switches = ("--tiled_mlp", "false", "--offload_activations", "false")
    stopped = launch_009(tmp_path, *no_switches, DRY_RUN="1", PATH=path)
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "fits in" not in stopped.stdout and "DOES NOT FIT in 79.6 GiB" in stopped.stdout
    assert "PLAN_OVERRIDE=1" in stopped.stderr and "+ accelerate launch" not in stopped.stdout
    overridden = launch_009(tmp_path, *no_switches, DRY_RUN="1", PLAN_OVERRIDE="1", PATH=path)
    assert overridden.returncode == 0, overridden.stderr[-2000:]
    assert "+ accelerate launch" in overridden.stdout and "--tiled_mlp false" in overridden.stdout
    fits = launch_009(tmp_path, DRY_RUN="1", PATH=path)
    assert fits.returncode == 0 and "fits in 79.6 GiB" in fits.stdout and "+ accelerate launch" in fits.stdout
