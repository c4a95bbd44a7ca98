"""One process with gradient accumulation 2 and two processes without it see the same samples in each optimizer
step, so they must give the same per-step loss and grad_norm and the same adapter: under plain DDP and under
DeepSpeed ZeRO-2, through the real launcher. A wrong process-count or accumulation factor in the loss, or a loss
normalised per micro-batch instead of per optimizer step, changes these numbers by whole factors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from launching import TRAIN_000 as TRAIN, run

from longctx import checkpoints

pytestmark = pytest.mark.e2e
# 16 records, the first 2 too long (dropped): 14 samples, an even number, so every optimizer step holds 2 samples
# either way (one process: 2 micro-batches; two processes: one each). 7 optimizer steps, a loss logged at each.
COMMON = ["--max_train_samples", "16", "--num_train_epochs", "1", "--logging_steps", "1", "--save_steps", "100",
          "--eval_strategy", "no", "--report_to", "none", "--full_determinism", "true"]


def train(out, *flags, **env):
    proc = run(["bash", TRAIN, *COMMON, *flags], OUTPUT_DIR=str(out), **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def per_step(run_dir) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) from the last checkpoint's trainer_state.json."""
    last = checkpoints.find_checkpoints(run_dir, include_final=False)[-1]
    history = checkpoints.read_trainer_state(last.path)["log_history"]
    return {row["step"]: (row["loss"], row["grad_norm"]) for row in history if "loss" in row}


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / checkpoints.FINAL_ADAPTER / checkpoints.ADAPTER_WEIGHTS)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("one")
    train(out, "--gradient_accumulation_steps", "2")
    return out


def test_the_samples_carry_different_label_counts(tiny_dir, tiny_tokenizer):
    """Otherwise a per-micro-batch mean and the per-step normalisation would coincide and prove nothing."""
    records = [json.loads(line) for line in (tiny_dir / "data" / "train.jsonl").read_text().splitlines()[2:16]]
    counts = {len(tiny_tokenizer(r["summary"])["input_ids"]) for r in records}
    assert len(counts) > 3, counts


@pytest.mark.parametrize("backend,env,port", [("ddp", {"USE_DEEPSPEED": "0"}, "29531"),
                                              ("zero2", {"USE_DEEPSPEED": "1"}, "29532")])
def test_two_processes_equal_one_process_with_accumulation(one_process, tmp_path, backend, env, port):
    out = tmp_path / backend
    proc = train(out, "--gradient_accumulation_steps", "1", NUM_PROCESSES="2", MASTER_PORT=port, **env)
    assert ("--use_deepspeed" in proc.stdout) == (backend == "zero2")
    assert "processes: 2" in proc.stdout

    expected, got = per_step(one_process), per_step(out)
    assert sorted(got) == sorted(expected) == list(range(1, 8))
    for step in expected:
        (loss_1, norm_1), (loss_2, norm_2) = expected[step], got[step]
        assert loss_2 == pytest.approx(loss_1, abs=1e-5), f"step {step}: loss {loss_2} vs {loss_1}"
        assert norm_2 == pytest.approx(norm_1, abs=1e-5), f"step {step}: grad_norm {norm_2} vs {norm_1}"

    if backend == "zero2":  # ZeRO-2 state in the checkpoint: one optimizer shard per rank
        assert len(list((out / "checkpoint-7" / "global_step7").glob("*optim_states.pt"))) == 2

    reference, trained = adapter(one_process), adapter(out)
    assert trained.keys() == reference.keys() and len(reference) > 0
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=0, msg=name)
