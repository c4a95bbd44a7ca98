"""Every experiment's ds_config_zero2.json, filled from the experiment's TrainingArguments the way the Trainer does,
validates offline with transformers' HfTrainerDeepSpeedConfig and DeepSpeed's own DeepSpeedConfig, and accumulates
gradients in fp32 on a real engine."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from transformers import TrainingArguments

from longctx.config import parse_config
from longctx.errors import ConfigError
from support.env import subprocess_env
from support.paths import EXPERIMENTS_DIR
from support.processes import free_port

EXPERIMENTS = ["000_tiny_smoke", "009_text_summary", "010_text_summary_sp4", "011_million_tokens"]
AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


@pytest.fixture()
def bf16_gpu(monkeypatch):
    """009 sets bf16: true and is sized for H100s; TrainingArguments refuses bf16 without a bf16 GPU."""
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)


def ds_path(experiment: str):
    return EXPERIMENTS_DIR / experiment / "ds_config_zero2.json"


def training_args(experiment: str, tmp_path) -> TrainingArguments:
    config = EXPERIMENTS_DIR / experiment / "config.yaml"
    try:
        parsed, _, _ = parse_config(["--config", str(config), "--output_dir", str(tmp_path / "out"),
                                     "--deepspeed", str(ds_path(experiment))])
    except ConfigError as err:
        pytest.fail(f"experiments/{experiment}/config.yaml does not parse with the installed transformers: {err}")
    (training,) = [p for p in parsed if isinstance(p, TrainingArguments)]
    return training


def filled_config(training: TrainingArguments, path) -> dict:
    """What the Trainer does: trainer_config_process at TrainingArguments time, trainer_config_finalize with the
    model and the number of steps; "auto" values become the TrainingArguments ones, mismatches raise."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf_config = HfTrainerDeepSpeedConfig(str(path))
    hf_config.trainer_config_process(training)
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=2560))  # Qwen3-4B's; only read for "auto" buckets
    hf_config.trainer_config_finalize(training, model, num_training_steps=100)
    assert hf_config.is_zero2() and not hf_config.is_zero3() and not hf_config.is_offload()
    return hf_config.config


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_raw_file_is_zero2_without_offload_and_auto_batch_keys(experiment):
    raw = json.loads(ds_path(experiment).read_text())
    zero = raw["zero_optimization"]
    assert zero["stage"] == 2
    assert zero.get("offload_optimizer", {"device": "none"})["device"] == "none"
    assert zero.get("offload_param", {"device": "none"})["device"] == "none"
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    for key in AUTO_KEYS:
        assert raw[key] == "auto", key


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_validates_with_transformers_and_deepspeed(experiment, tmp_path, bf16_gpu):
    from deepspeed.runtime.config import DeepSpeedConfig

    training = training_args(experiment, tmp_path)
    config = filled_config(training, ds_path(experiment))
    assert config["train_micro_batch_size_per_gpu"] == training.per_device_train_batch_size
    assert config["gradient_accumulation_steps"] == training.gradient_accumulation_steps
    assert config["gradient_clipping"] == training.max_grad_norm
    assert config["train_batch_size"] == (training.world_size * training.per_device_train_batch_size
                                          * training.gradient_accumulation_steps)
    assert config["bf16"]["enabled"] is bool(training.bf16 or training.bf16_full_eval)
    assert "auto" not in json.dumps(config)

    # Without a process group DeepSpeed takes world size 1, as does TrainingArguments on this machine.
    assert training.world_size == 1
    ds = DeepSpeedConfig(copy.deepcopy(config))
    assert ds.world_size == 1
    assert ds.zero_optimization_stage == 2
    assert ds.zero_config.offload_optimizer is None or ds.zero_config.offload_optimizer.device == "none"
    assert ds.zero_config.offload_param is None or ds.zero_config.offload_param.device == "none"
    assert ds.zero_config.overlap_comm is True
    assert ds.zero_config.contiguous_gradients is True
    assert ds.train_micro_batch_size_per_gpu == training.per_device_train_batch_size
    assert ds.gradient_accumulation_steps == training.gradient_accumulation_steps
    assert ds.gradient_clipping == training.max_grad_norm
    assert ds.bfloat16_config.enabled is bool(training.bf16)


def test_009_fills_reference_batch_values(tmp_path, bf16_gpu):
    config = filled_config(training_args("009_text_summary", tmp_path), ds_path("009_text_summary"))
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (1, 8)
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False


def test_a_hard_coded_mismatch_is_caught(tmp_path):
    """The check above has teeth: a value that disagrees with TrainingArguments is rejected by name."""
    training = training_args("000_tiny_smoke", tmp_path)
    raw = json.loads(ds_path("000_tiny_smoke").read_text())
    raw["gradient_accumulation_steps"] = training.gradient_accumulation_steps + 1
    bad = tmp_path / "ds_bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        filled_config(training, bad)


ACCUMULATION = """
import json, os, sys
import deepspeed, torch
config = json.loads(open(sys.argv[1]).read())
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
seen = []
for _ in range(config["gradient_accumulation_steps"]):
    loss = engine(torch.randn(4, 8, dtype=next(engine.parameters()).dtype)).float().pow(2).mean()
    engine.backward(loss)
    seen.append(sorted({str(t.dtype) for buffers in engine.optimizer.averaged_gradients.values()
                        for t in (buffers if isinstance(buffers, list) else [buffers])}))
    engine.step()
print(json.dumps([str(next(engine.parameters()).dtype), seen]))
"""


def accumulation_dtypes(config: dict, tmp_path) -> tuple[str, list]:
    """A real DeepSpeed engine from `config` (one gloo process, its own interpreter) on a two-layer model, one
    optimizer step of its micro-batches: the parameters' dtype and ZeRO's gradient accumulation buffer's dtypes
    after each backward."""
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({**config, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    env = subprocess_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-c", ACCUMULATION, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, seen = json.loads(proc.stdout.strip().splitlines()[-1])
    return params, seen


@pytest.mark.parametrize("experiment", ["009_text_summary", "010_text_summary_sp4", "011_million_tokens"])
def test_every_bf16_experiment_keeps_fp32_gradient_accumulation_in_the_filled_config(bf16_gpu, experiment, tmp_path):
    """The config DeepSpeed gets (the file with the Trainer's "auto" values filled) keeps the setting: the one the
    engine test below shows DeepSpeed to act on. 009's, 010's and 011's files are one text (also checked)."""
    config = filled_config(training_args(experiment, tmp_path), ds_path(experiment))
    assert config["bf16"]["enabled"] is True and config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds_path(experiment).read_text() == ds_path("009_text_summary").read_text()


def test_000s_buckets_hold_the_tiny_models_gradients_and_are_all_it_changes_of_009s():
    """DeepSpeed allocates two reduce buckets every micro-step (torch.empty in ZeRO's setup_buckets): a GPU's caching
    allocator hands the same memory back, a CPU maps 2 x 800 MB afresh for 009's 200,000,000 elements (measured here:
    1.6 s per optimizer step of 000 on two processes, 0.25 s with 500,000, the same losses). 000's trainable
    gradients, by hand (lora_r 64, hidden 128, 4 heads and 2 KV heads of 32, intermediate 256; r x (in + out)):
    q, o 64 x 256 = 16,384 each; k, v 64 x 192 = 12,288 each; gate, up, down 64 x 384 = 24,576 each: 131,072 per
    layer, 262,144 for 2 layers: one bucket holds them all, as 009's holds Qwen3-4B's."""
    raw = {e: json.loads(ds_path(e).read_text()) for e in ("000_tiny_smoke", "009_text_summary")}
    buckets = ("reduce_bucket_size", "allgather_bucket_size")
    tiny = raw["000_tiny_smoke"]["zero_optimization"]
    assert 262_144 <= tiny["reduce_bucket_size"] == tiny["allgather_bucket_size"] <= 2**20  # at most 4 MiB each
    for config in raw.values():
        for key in buckets:
            del config["zero_optimization"][key]
    assert raw["000_tiny_smoke"] == raw["009_text_summary"]


def test_zero2_accumulates_the_micro_batches_gradients_in_fp32(bf16_gpu, tmp_path):
    """bf16 weights, and the gradients of the step's micro-batches summed in fp32 (data_types.grad_accum_dtype):
    DeepSpeed's default is the model's dtype, and summing 8 (009) or 32 (010, 011) bf16 micro-batch gradients keeps
    8 bits of mantissa. Measured with 009's config on a real engine (010's and 011's are the same file), and without
    the setting for comparison."""
    config = filled_config(training_args("009_text_summary", tmp_path), ds_path("009_text_summary"))
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2, train_batch_size=2)
    params, buffers = accumulation_dtypes(config, tmp_path)
    assert params == "torch.bfloat16"
    assert buffers == [["torch.float32"], ["torch.float32"]]  # from the first micro-batch on
    del config["data_types"]  # what DeepSpeed does without the setting: the buffer in bf16
    assert accumulation_dtypes(config, tmp_path)[1] == [[], ["torch.bfloat16"]]
