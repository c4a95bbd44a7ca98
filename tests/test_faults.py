"""Faults, injected for real: kill -9 and resume, truncated checkpoints, bad records, NaN loss, a hang in
teardown, an altered adapter, secrets in the environment."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO_ROOT, subprocess_env, write_jsonl
from launching import TRAIN_000 as TRAIN, Started, experiment_with, launch_experiment, run

from longctx import checkpoints

pytestmark = pytest.mark.e2e
TRAIN_PY = REPO_ROOT / "experiments" / "000_tiny_smoke" / "train_cluster.py"
CONFIG = REPO_ROOT / "experiments" / "000_tiny_smoke" / "config.yaml"
# fp32 (the 000 config), deterministic algorithms, a loss logged every step; 14 kept records, 2 epochs.
RESUMABLE = ["--max_train_samples", "16", "--max_eval_samples", "2", "--num_train_epochs", "2", "--save_steps", "3",
             "--eval_steps", "1000", "--logging_steps", "1", "--full_determinism", "true", "--report_to", "none"]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from the newest checkpoint's trainer_state.json (the whole run's history)."""
    last = checkpoints.find_checkpoints(run_dir, include_final=False)[-1]
    history = checkpoints.read_trainer_state(last.path)["log_history"]
    return {row["step"]: row["loss"] for row in history if "loss" in row}


def launch(out: Path, extra: list[str], timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return run(["bash", TRAIN, *extra], timeout=timeout, OUTPUT_DIR=str(out), **env)


def kill_after_checkpoint(out: Path, extra: list[str], step: int, **env) -> None:
    """Start training and SIGKILL the whole job once it prints that checkpoint-<step> is complete."""
    started = Started(["bash", TRAIN, *extra], OUTPUT_DIR=str(out), **env)
    try:
        started.wait_for(f"checkpoint-{step} (step {step})", timeout=600)
    finally:
        started.kill()
        # torch elastic starts each rank in a session of its own: kill every process of this run, as a scheduler
        # would.
        for child in psutil.process_iter(["cmdline"]):
            if str(out) in " ".join(child.info["cmdline"] or []):
                child.kill()
    assert (out / f"checkpoint-{step}" / checkpoints.MANIFEST).exists()
    assert not (out / "final_adapter").exists(), "killed too late: the run had already finished"


@pytest.mark.parametrize("processes", ["1", "2"])
def test_kill_and_relaunch_reproduces_the_uninterrupted_run(tmp_path, tiny_dir, processes):
    env = {"NUM_PROCESSES": processes, "MASTER_PORT": "29521" if processes == "2" else "29520"}
    whole = launch(tmp_path / "whole", RESUMABLE, **env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    kill_after_checkpoint(out, RESUMABLE, step=3, **env)
    relaunch = launch(out, RESUMABLE, **env)  # the same command, RESUME=auto by default
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    resumed = re.search(r"resuming from \S+checkpoint-(\d+) \(step (\d+)\)", relaunch.stdout)
    assert resumed, relaunch.stdout[-2000:]
    resume_step = int(resumed.group(2))

    expected, got = step_losses(tmp_path / "whole"), step_losses(out)
    after = [s for s in expected if s > resume_step]
    assert after and sorted(got) == sorted(expected)
    diffs = [abs(expected[s] - got[s]) for s in after]
    assert max(diffs) <= 1e-5, f"largest loss difference after step {resume_step}: {max(diffs)}"
    print(f"processes={processes}: resumed at step {resume_step}, largest loss difference {max(diffs):.3g}")


def test_resume_never_refuses_a_used_output_dir_unless_overwrite(tmp_path, tiny_dir):
    quick = ["--max_train_samples", "6", "--num_train_epochs", "1", "--save_steps", "2", "--report_to", "none"]
    assert launch(tmp_path, quick).returncode == 0
    refused = launch(tmp_path, quick, RESUME="never")
    assert refused.returncode != 0
    assert "RESUME=auto" in refused.stderr and "OVERWRITE=1" in refused.stderr
    fresh = launch(tmp_path, quick, RESUME="never", OVERWRITE="1")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "overwrite: removed" in fresh.stdout and "resuming from" not in fresh.stdout


def test_incomplete_checkpoints_are_skipped_by_resume_and_listing(tmp_path, tiny_dir):
    proc = launch(tmp_path, ["--max_train_samples", "12", "--num_train_epochs", "1", "--save_steps", "2",
                             "--report_to", "none"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [c.global_step for c in checkpoints.find_checkpoints(tmp_path, include_final=False)]
    assert steps == [2, 4, 5]
    weights = tmp_path / "checkpoint-5" / checkpoints.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a crash mid-write
    (tmp_path / "checkpoint-4" / checkpoints.MANIFEST).unlink()  # save interrupted before the marker
    warnings: list[str] = []
    latest = checkpoints.latest_resumable(tmp_path, warn=warnings.append)
    assert latest.global_step == 2
    assert any("checkpoint-5" in w and checkpoints.ADAPTER_WEIGHTS in w and "truncated" in w for w in warnings)
    assert any("checkpoint-4" in w and "manifest.json is missing" in w for w in warnings)
    relaunch = launch(tmp_path, ["--max_train_samples", "12", "--num_train_epochs", "1", "--save_steps", "2",
                                 "--report_to", "none"])
    assert relaunch.returncode == 0
    assert "resuming from" in relaunch.stdout and "checkpoint-2 (step 2)" in relaunch.stdout
    assert "skipping" in relaunch.stdout and "checkpoint-5" in relaunch.stdout


def _train_py(args: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN_PY), "--config", str(CONFIG), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env))


def test_bad_record_stops_before_the_model_loads(tmp_path, tiny_dir):
    good = [json.loads(line) for line in (tiny_dir / "data" / "train.jsonl").read_text().splitlines()[2:6]]
    bad = write_jsonl(tmp_path / "train.jsonl", [good[0], good[1], {"document": "text", "summary": 7}, good[2]])
    out = tmp_path / "out"
    proc = _train_py(["--train_file", str(bad), "--output_dir", str(out), "--report_to", "none"])
    assert proc.returncode == 2
    assert f"{bad}: line 3: field 'summary' must be a string" in proc.stderr
    assert not (out / "run_info.json").exists()  # stopped before anything expensive


def test_on_bad_record_skip_lists_and_trains_on_the_rest(tmp_path, tiny_dir):
    lines = (tiny_dir / "data" / "train.jsonl").read_text().splitlines()[2:8]
    bad = write_jsonl(tmp_path / "train.jsonl", [lines[0], "{not json", lines[1], '{"document": ""}', *lines[2:]])
    out = tmp_path / "out"
    proc = _train_py(["--train_file", str(bad), "--output_dir", str(out), "--on_bad_record", "skip",
                      "--num_train_epochs", "1", "--save_steps", "100", "--eval_steps", "100", "--report_to", "none"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = [json.loads(x) for x in (out / "bad_records.jsonl").read_text().splitlines()]
    assert [(r["line"], r["file"]) for r in report] == [(2, str(bad)), (4, str(bad))]
    assert "not a JSON object" in report[0]["reason"] and "'document' is empty" in report[1]["reason"]
    assert "train 2, validation 0" in proc.stdout
    assert "train: 6 records" in proc.stdout  # the 6 usable ones were trained on
    assert json.loads((out / "final_adapter" / "final_state.json").read_text())["global_step"] == 3

    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", ["{", '{"document": 1, "summary": "x"}'])
    proc = _train_py(["--train_file", str(all_bad), "--output_dir", str(tmp_path / "o2"), "--on_bad_record", "skip"])
    assert proc.returncode == 2 and "all 2 records are unusable" in proc.stderr


def test_nan_loss_stops_at_that_step_without_a_poisoned_checkpoint(tmp_path, tiny_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    # "~": a character no record of the tiny corpus holds. (The text of a control token such as <|endoftext|> would
    # not do: record text is tokenized as plain text, longctx.chat.)
    poison = tokenizer.convert_tokens_to_ids("~")
    model.config.tie_word_embeddings = False  # corrupt the input row only, not the output projection
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("nan")  # a corrupted embedding row
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    records = [json.loads(x) for x in (tiny_dir / "data" / "train.jsonl").read_text().splitlines()[2:12]]
    assert not any("~" in json.dumps(record) for record in records)
    records[0]["document"] += " ~"  # the one sample that reaches the corrupted row
    train = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "out"
    proc = _train_py(["--model_name_or_path", str(tmp_path / "model"), "--train_file", str(train),
                      "--output_dir", str(out), "--save_steps", "1", "--eval_steps", "100", "--num_train_epochs", "1",
                      "--report_to", "none"])
    assert proc.returncode != 0
    match = re.search(r"non-finite training loss at step (\d+)", proc.stderr)
    assert match, proc.stderr[-3000:]
    bad_step = int(match.group(1))
    assert bad_step > 1, "the poisoned sample came first; the test would not show the earlier checkpoints kept"
    saved = checkpoints.find_checkpoints(out, include_final=True)
    assert all(c.global_step < bad_step for c in saved) and not (out / "final_adapter").exists()
    assert [c.global_step for c in saved] == list(range(1, bad_step))
    for c in saved:
        tensors = load_file(c.path / checkpoints.ADAPTER_WEIGHTS)
        assert all(torch.isfinite(t).all() for t in tensors.values())


HANG = """
import os, sys, time


def hang(*_args, **_kwargs):  # a peer that never answers
    print(f"hanging at {time.monotonic()}", file=sys.stderr, flush=True)
    time.sleep(3600)
"""
WATCHDOG_BOUND = 60  # seconds past the watchdog's timeout within which the process must be gone (loaded machine)


def hanging_run(tmp_path, patch: str, flags: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Train an experiment whose train_cluster.py installs `patch` (which calls hang() somewhere); returns the
    finished process and the seconds from the hang's start to the process's exit (CLOCK_MONOTONIC is one clock for
    every process of the machine)."""
    exp = experiment_with(tmp_path, HANG + patch)
    proc = launch_experiment(exp, ["--max_train_samples", "6", "--num_train_epochs", "1", "--report_to", "none",
                                   *flags], timeout=600, OUTPUT_DIR=str(tmp_path / "o"))
    exited = time.monotonic()
    started = re.search(r"hanging at ([0-9.]+)", proc.stderr)
    assert started, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, exited - float(started.group(1))


def test_hang_in_teardown_is_cut_by_the_watchdog_with_stacks(tmp_path, tiny_dir):
    proc, hung = hanging_run(tmp_path, "import longctx.train\nlongctx.train.teardown = hang\n",
                             ["--save_steps", "100", "--eval_steps", "100", "--watchdog_timeout_seconds", "12"])
    assert proc.returncode != 0
    assert hung <= 12 + WATCHDOG_BOUND
    assert ("watchdog: the end of the run (last eval and save, final adapter, teardown) must finish within 12 s "
            "(watchdog_timeout_seconds), or every thread's stack is written to the log and the process exits\n"
            in proc.stderr)
    assert "Timeout (0:00:12)!" in proc.stderr  # faulthandler's dump header
    assert re.search(r'File ".*train_cluster\.py", line 7 in hang', proc.stderr)  # the stuck frame is named
    assert (tmp_path / "o" / "final_adapter" / checkpoints.MANIFEST).is_file()  # the save itself had finished


def test_hang_in_the_last_checkpoint_save_is_cut_by_the_end_of_run_watchdog(tmp_path, tiny_dir):
    """The Trainer writes its last checkpoint inside train(), after the last step: the end-of-run guard is armed
    by then. 6 records (2 dropped), accumulation 2: 2 optimizer steps; the save at step 2 hangs."""
    patch = ("from longctx.callbacks import ManifestCallback\n"
             "ManifestCallback.on_save = lambda self, args, state, control, **kw: hang() if state.global_step == 2 "
             "else None\n")
    proc, hung = hanging_run(tmp_path, patch, ["--save_steps", "1", "--eval_steps", "100",
                                               "--watchdog_timeout_seconds", "12"])
    assert proc.returncode != 0 and hung <= 12 + WATCHDOG_BOUND
    assert "watchdog: the end of the run (last eval and save, final adapter, teardown) must finish within 12 s" \
        in proc.stderr
    assert "Timeout (0:00:12)!" in proc.stderr and "in <lambda>" in proc.stderr
    assert not (tmp_path / "o" / "final_adapter").exists()


def test_step_watchdog_guards_the_evaluation_of_its_step(tmp_path, tiny_dir):
    """With step_timeout_seconds, a step's guard lasts through the eval and save the Trainer runs after it."""
    patch = ("from longctx.trainer import LongContextTrainer\n"
             "LongContextTrainer.evaluate = hang\n")
    proc, hung = hanging_run(tmp_path, patch, ["--save_steps", "100", "--eval_steps", "1",
                                               "--step_timeout_seconds", "12", "--watchdog_timeout_seconds", "3600"])
    assert proc.returncode != 0 and hung <= 12 + WATCHDOG_BOUND
    assert ("watchdog: each optimizer step, with its eval and save, must finish within 12 s (step_timeout_seconds)"
            in proc.stderr)
    assert proc.stderr.count("must finish within 12 s") == 1  # said once, not at every step
    assert "Timeout (0:00:12)!" in proc.stderr and re.search(r'train_cluster\.py", line 7 in hang', proc.stderr)


INF_GRADIENT = """
import os

import longctx.train

real_apply_lora = longctx.train.apply_lora


def apply_lora_with_an_inf_gradient(model, lora_args):
    \"\"\"On one rank, the gradient of one LoRA weight becomes inf / NaN in one backward; the loss stays finite.\"\"\"
    model = real_apply_lora(model, lora_args)
    if os.environ.get("RANK", "0") == os.environ["FAULT_RANK"]:
        weight = next(p for name, p in model.named_parameters() if "q_proj.lora_B" in name)
        backwards = [0]

        def poison(grad):
            backwards[0] += 1
            return grad * float("inf") if backwards[0] == int(os.environ["FAULT_BACKWARD"]) else grad

        weight.register_hook(poison)
    return model


longctx.train.apply_lora = apply_lora_with_an_inf_gradient
"""


@pytest.mark.parametrize("processes", ["1", "2"], ids=["one-process", "two-processes-zero2"])
def test_non_finite_gradient_norm_stops_every_rank_before_the_step(tmp_path, tiny_dir, processes):
    """Accumulation 2: backward 5 belongs to optimizer step 3. With two processes (ZeRO-2) only rank 1's gradient
    is poisoned: both ranks must stop, naming step 3; checkpoints 1 and 2 stay, hold finite weights, and no later
    checkpoint or final adapter exists."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "o"
    proc = launch_experiment(experiment_with(tmp_path, INF_GRADIENT),
                             ["--max_train_samples", "16", "--num_train_epochs", "1", "--save_steps", "1",
                              "--eval_steps", "100", "--report_to", "none"],
                             OUTPUT_DIR=str(out), NUM_PROCESSES=processes, MASTER_PORT="29561",
                             FAULT_RANK=str(int(processes) - 1), FAULT_BACKWARD="5")
    assert proc.returncode != 0
    message = "non-finite gradient norm at step 3"
    assert proc.stderr.count(message) >= int(processes), proc.stderr[-3000:]  # every rank names it
    if processes == "2":
        assert "[rank0]" in proc.stderr and "[rank1]" in proc.stderr
        assert "[rank0]: longctx.trainer.NonFiniteError: " + message in proc.stderr
    saved = checkpoints.find_checkpoints(out, include_final=True)
    assert [c.name for c in saved] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "checkpoint-3").exists() and not (out / "final_adapter").exists()
    for c in saved:
        assert all(torch.isfinite(t).all() for t in load_file(c.path / checkpoints.ADAPTER_WEIGHTS).values())


def test_final_adapter_manifest_and_altered_adapter_refused(tmp_path, tiny_dir):
    out = tmp_path / "out"
    proc = _train_py(["--output_dir", str(out), "--max_train_samples", "4", "--num_train_epochs", "1",
                      "--save_steps", "100", "--eval_steps", "100", "--report_to", "none"],
                     WANDB_API_KEY="sk-test-SECRET123", HF_TOKEN="hf_SECRET456", WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SECRET123" not in proc.stdout + proc.stderr and "SECRET456" not in proc.stdout + proc.stderr
    final = out / "final_adapter"
    manifest = json.loads((final / checkpoints.MANIFEST).read_text())
    assert manifest["global_step"] == 1 and len(manifest["git_commit"] or "") == 40
    weights = manifest["files"][checkpoints.ADAPTER_WEIGHTS]
    assert weights["size"] == (final / checkpoints.ADAPTER_WEIGHTS).stat().st_size and len(weights["sha256"]) == 64
    assert checkpoints.adapter_problem(final) is None

    data = bytearray((final / checkpoints.ADAPTER_WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # same size, one byte altered
    (final / checkpoints.ADAPTER_WEIGHTS).write_bytes(bytes(data))
    assert "does not match its sha256" in checkpoints.adapter_problem(final)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "000_tiny_smoke" / "eval_checkpoint.py"),
                           "--config", str(CONFIG), "--checkpoint", str(final), "--report_to", "none"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 2 and "does not match its sha256" in proc.stderr


def test_no_unsafe_loading_in_the_code():
    """torch.load only with weights_only=True; trust_remote_code only from the setting (default off)."""
    from longctx.settings import ModelArguments

    assert ModelArguments().trust_remote_code is False
    for path in (REPO_ROOT / "longctx").glob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "trust_remote_code=True" not in text, path.name
