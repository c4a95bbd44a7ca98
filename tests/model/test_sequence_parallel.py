"""Ulysses sequence parallelism (sequence_parallel_size): two processes share every sample under DeepSpeed ZeRO-2,
through the real launcher, and give the numbers of one process training on the same data.

Why the session's reference run is the right comparison: it trains one process with gradient accumulation 2, so
optimizer step k holds samples 2k and 2k+1 of the shuffled order. With two processes the dataloader gives rank 0
samples 0, 2, 4, ... and rank 1 samples 1, 3, 5, ... (the plain two-process runs of test_equivalence.py rely on the
same order); DeepSpeed's adapter gathers one batch from each rank of the SP group and hands them out in rank order,
each cut in two along the sequence, so micro-batches come as samples 0, 1, 2, 3, ... and the Trainer counts
14 (samples per rank: 7) x 2 (the SP size) = 14 micro-batches. Gradient accumulation 2 then puts samples 2k and
2k+1 into step k, as in the reference: 7 optimizer steps. SP runs on CPU pad every sample to max_seq_length (1,024;
gloo gathers equal shapes only): the padding follows the tokens, carries no label and is never attended to by a
token (causal attention, position_ids and no mask), so the numbers are those of the unpadded reference (measured:
5e-7; a change in the padding's effect would show as a difference far above 1e-5)."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from longctx.model.sequence_parallel import gradient_average_size
from longctx.run import checkpoints, layout
from support import gates
from support.launching import REFERENCE, Started, assert_same_steps, experiment_with, run, step_metrics
from support.paths import CONFIG_000, LAUNCH
from support.paths import TRAIN_000 as TRAIN

SP = [*REFERENCE, "--gradient_accumulation_steps", "2", "--sequence_parallel_size", "2", "--report_to", "none"]
TILED = ["--tiled_mlp", "true", "--tiled_mlp_tile_tokens", "128"]  # 512 tokens per rank: 4 tiles per MLP


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def sp_env() -> dict[str, str]:
    return {"NUM_PROCESSES": "2", "USE_DEEPSPEED": "1", "MASTER_PORT": free_port()}


def assert_same_adapter(run_dir: Path, reference_dir: Path) -> float:
    """Every LoRA tensor of the final adapters equal to 1e-5; returns the largest difference."""
    ours, reference = (load_file(d / layout.FINAL_ADAPTER / layout.ADAPTER_WEIGHTS)
                       for d in (run_dir, reference_dir))
    assert ours.keys() == reference.keys() and len(reference) > 0
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=0, msg=name)
    return max((ours[name] - tensor).abs().max().item() for name, tensor in reference.items())


# --- unit: how SP scales and resumes ----------------------------------------------------------------------------


def test_gradient_average_size_is_what_deepspeed_divides_by():
    # ZeRO 1/2 average over the data-parallel groups: 8 GPUs, SP 4 -> 2 groups; ZeRO 3's reduce-scatter over all 8
    assert gradient_average_size(8, 4, zero_stage=2) == 2
    assert gradient_average_size(8, 4, zero_stage=1) == 2
    assert gradient_average_size(4, 4, zero_stage=2) == 1
    assert gradient_average_size(8, 4, zero_stage=3) == 8


def _walk_loader(rank: int, out_dir: str, port: str) -> None:
    """One of two processes: 8 samples of 4 tokens (sample i holds tokens 10i .. 10i+3), rank r's dataloader the
    samples r, r+2, r+4, r+6 (as accelerate shards them); records what the SP loader yields whole and after
    skipping 3 and 4 micro-batches."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    import deepspeed.comm
    import torch.distributed as dist
    from accelerate import PartialState
    from torch.utils.data import DataLoader

    from longctx.training.sp_dataloader import SequenceParallelLoader, skip_first_batches_sp

    PartialState(cpu=True)
    deepspeed.comm.init_distributed(dist_backend="gloo")
    samples = [{"input_ids": torch.arange(10 * i, 10 * i + 4), "position_ids": torch.arange(4),
                "labels": torch.arange(10 * i, 10 * i + 4)} for i in range(8)]
    loader = SequenceParallelLoader(DataLoader(samples[rank::2], batch_size=1), sp_rank=rank,
                                    sp_group=dist.group.WORLD, sp_world_size=2, device="cpu")
    seen = {"whole": [b["input_ids"].tolist() for b in loader],
            "after 3": [b["input_ids"].tolist() for b in skip_first_batches_sp(loader, 3)],
            "after 4": [b["input_ids"].tolist() for b in skip_first_batches_sp(loader, 4)],
            "shift_labels": next(iter(loader))["shift_labels"].tolist()}
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_the_sp_loader_resumes_mid_epoch_on_any_micro_batch(tmp_path):
    """Skipping n micro-batches skips n // 2 batches of the inner dataloader and consumes n % 2 more: the rest is
    exactly what an uninterrupted epoch yields after its first n (3: in the middle of a gathered pair)."""
    torch.multiprocessing.spawn(_walk_loader, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        # micro-batch k is sample k (rank 0's j-th sample is 2j, rank 1's is 2j+1, handed out in rank order), and
        # rank r holds its tokens 2r and 2r+1
        expected = [[[10 * k + 2 * rank, 10 * k + 2 * rank + 1]] for k in range(8)]
        assert seen["whole"] == expected
        assert seen["after 3"] == expected[3:] and seen["after 4"] == expected[4:]
        # sample 0's labels 0 1 2 3, shifted (1 2 3 -100) and cut: rank 0 predicts 1 2, rank 1 predicts 3
        assert seen["shift_labels"] == ([[1, 2]] if rank == 0 else [[3, -100]])


def test_the_sp_loader_forwards_the_epoch_to_its_dataloader():
    from longctx.training.sp_dataloader import SequenceParallelLoader

    class Inner(list):
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

    inner = Inner([1, 2])
    SequenceParallelLoader(inner, sp_rank=0, sp_group=None, sp_world_size=2, device="cpu").set_epoch(3)
    assert inner.epoch == 3  # the inner dataloader's shuffling order is that of epoch 3


# --- end to end: the real launcher, two processes, DeepSpeed ZeRO-2 ------------------------------------------------


def validation_eval_loss(run_dir: Path, tiny_dir: Path) -> float:
    """The evaluation loss two processes report for the final adapter, computed here from the model itself.

    The Trainer evaluates batches of one sample per process and, in each evaluation step, averages over the two
    processes with the label tokens of both (average_tokens_across_devices): step j holds validation samples 2j
    (rank 0) and 2j+1 (rank 1) and its loss is (s_2j + s_2j+1) / (c_2j + c_2j+1) (s: summed cross-entropy over a
    sample's label tokens, c: their count); the logged eval_loss is the mean over the steps. Here s and c come
    from full logits (longctx.model.loss.reference_loss) of the base model with the final adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx.config import parse_config
    from longctx.data.dataset import tokenize_split
    from longctx.model.loss import reference_loss
    from longctx.settings import Settings

    parsed, _, _ = parse_config(["--config", str(CONFIG_000),
                                 "--max_eval_samples", "4", "--output_dir", str(run_dir)])
    data = Settings.from_groups(parsed).data
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    samples, _ = tokenize_split(data.validation_file, "validation", tokenizer, data, 4)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, run_dir / layout.FINAL_ADAPTER).eval()
    sums, counts = [], []
    with torch.no_grad():
        for sample in samples:
            ids, labels = torch.tensor([sample["input_ids"]]), torch.tensor([sample["labels"]])
            count = int((labels[:, 1:] != -100).sum())
            sums.append(reference_loss(model(input_ids=ids).logits, labels).item() * count)
            counts.append(count)
    return sum((sums[j] + sums[j + 1]) / (counts[j] + counts[j + 1]) for j in (0, 2)) / 2


@pytest.mark.e2e
def test_two_processes_sharing_every_sample_equal_one_process(reference_run, tmp_path, tiny_dir):
    """SP 2 under ZeRO-2 with activation checkpointing (000's): the reference's loss and grad_norm at every step,
    its adapter, and (SP off in evaluation) the evaluation loss of two processes."""
    out = tmp_path / "sp"
    proc = run(["bash", TRAIN, *SP], OUTPUT_DIR=str(out), **sp_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--use_deepspeed" in proc.stdout
    assert "processes: 2; max_seq_length: 1024; sequence parallel: 2 processes per sample" in proc.stdout
    worst = assert_same_steps(step_metrics(out), step_metrics(reference_run[0]))
    adapter = assert_same_adapter(out, reference_run[0])
    # ZeRO-2 state in the checkpoint: one optimizer shard per rank
    assert len(list((out / "checkpoint-7" / "global_step7").glob("*optim_states.pt"))) == 2
    history = checkpoints.read_trainer_state(out / "checkpoint-7")["log_history"]
    (logged,) = [row["eval_loss"] for row in history if "eval_loss" in row and row["step"] == 7]
    assert logged == pytest.approx(validation_eval_loss(out, tiny_dir), abs=1e-5)
    print(f"SP 2 vs one process: largest per-step difference {worst:.2g}, adapter {adapter:.2g}")


@pytest.mark.e2e
def test_sp_with_tiled_mlp_killed_and_relaunched_equals_one_process(reference_run, tmp_path):
    """SP 2 with tiled_mlp (4 tiles per MLP) and activation checkpointing; kill -9 of the whole job while rank 0 is
    held inside step 4 (after checkpoint-3), then the same command: it resumes from step 3 (the inner dataloader
    skips the 3 batches per rank already trained on) and every step's loss and grad_norm, and the final adapter,
    equal the reference's."""
    out, env, fifo = tmp_path / "killed", sp_env(), gates.gate(tmp_path)
    exp = experiment_with(tmp_path, gates.inside_step(4))
    flags = [*SP, *TILED]
    started = Started(["bash", LAUNCH, exp, *flags], OUTPUT_DIR=str(out), GATE=str(fifo), **env)
    try:
        started.wait_for("gate: inside step 4", timeout=600)
    finally:
        started.kill()
        for child in psutil.process_iter(["cmdline"]):  # each rank runs in a session of its own (torch elastic)
            if str(out) in " ".join(child.info["cmdline"] or []):
                child.kill()
    assert "tiled MLP: on (2 layers, tiles of 128 tokens" in started.output()
    assert (out / "checkpoint-3" / layout.MANIFEST).exists() and not (out / "checkpoint-4").exists()
    proc = run(["bash", LAUNCH, exp, *flags], OUTPUT_DIR=str(out), **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"resuming from \S+checkpoint-3 \(step 3\)", proc.stdout), proc.stdout[-2000:]
    worst = assert_same_steps(step_metrics(out), step_metrics(reference_run[0]))
    adapter = assert_same_adapter(out, reference_run[0])
    print(f"SP 2 + tiled MLP, killed and resumed: largest per-step difference {worst:.2g}, adapter {adapter:.2g}")


@pytest.mark.e2e
@pytest.mark.parametrize("env,flags,expected", [
    ({"NUM_PROCESSES": "3"}, ["--sequence_parallel_size", "2"],
     "error: setting 'sequence_parallel_size' = 2: the launch has 3 processes (NUM_PROCESSES x NUM_MACHINES), not a "
     "multiple of 2; launch a multiple of 2 processes, or set sequence_parallel_size to a divisor of 3."),
    ({"NUM_PROCESSES": "2", "USE_DEEPSPEED": "0"}, ["--sequence_parallel_size", "2"],
     "error: setting 'sequence_parallel_size' = 2: it needs DeepSpeed (Ulysses sequence parallelism is "
     "DeepSpeed's); launch with USE_DEEPSPEED=1 (the launcher's default for several processes) or set "
     "sequence_parallel_size: 1."),
], ids=["world size", "no DeepSpeed"])
def test_the_launcher_refuses_sp_it_cannot_run_before_anything_starts(tmp_path, tiny_dir, env, flags, expected):
    """The preflight knows the launch's size (NUM_PROCESSES x NUM_MACHINES) and whether DeepSpeed is on: one line,
    exit 2, nothing launched. (Heads SP cannot divide are refused by the same validation, from the model's
    architecture: tests/test_config.py::test_sequence_parallel_refuses_heads_it_does_not_divide.)"""
    proc = run(["bash", TRAIN, *REFERENCE, *flags], OUTPUT_DIR=str(tmp_path / "out"), **env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == expected
    assert "accelerate launch" not in proc.stdout and not (tmp_path / "out").exists()

