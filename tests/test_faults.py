"""Faults, injected for real: kill -9 and resume, truncated checkpoints, bad records, NaN loss, a hang in
teardown, an altered adapter, secrets in the environment."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from longctx.run import checkpoints, layout
from support import gates
from support.env import subprocess_env, write_jsonl
from support.launching import (
    REFERENCE,
    Started,
    assert_same_steps,
    experiment_with,
    launch_experiment,
    run,
    step_metrics,
    wandb_records,
)
from support.paths import CONFIG_000 as CONFIG
from support.paths import EVAL_PY_000, LAUNCH, REPO_ROOT
from support.paths import TRAIN_000 as TRAIN
from support.paths import TRAIN_PY_000 as TRAIN_PY

pytestmark = pytest.mark.e2e


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
    assert (out / f"checkpoint-{step}" / layout.MANIFEST).exists()
    assert not (out / "final_adapter").exists(), "killed too late: the run had already finished"


def relaunch_resumes(out: Path, extra: list[str], exp: Path | None = None,
                     **env) -> tuple[subprocess.CompletedProcess, int]:
    """The same command again (RESUME=auto; 000's launcher, or `exp`'s): it must resume; returns the run and the
    step it resumed from."""
    command = ["bash", LAUNCH, exp] if exp else ["bash", TRAIN]
    proc = run([*command, *extra], OUTPUT_DIR=str(out), **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = re.search(r"resuming from \S+checkpoint-(\d+) \(step (\d+)\)", proc.stdout)
    assert resumed, proc.stdout[-2000:]
    return proc, int(resumed.group(2))


def test_kill_and_relaunch_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    """kill -9 of the whole job after checkpoint-3, then the same command: the per-step losses and grad norms equal
    the reference's (one process, never interrupted), and the relaunch continues the same W&B run (offline), its
    steps after the resume step. Two processes: kill -9 and relaunch under ZeRO-2 are
    test_sequence_parallel.py's (two ranks sharing each sample), resuming a two-rank ZeRO-2 checkpoint exactly is
    the stop-signal test below; the job kept to one process here saves CI a third two-process run."""
    flags = [*REFERENCE, "--gradient_accumulation_steps", "2"]
    out = tmp_path / "killed"
    kill_after_checkpoint(out, flags, step=3, NUM_PROCESSES="1", MASTER_PORT="29520")
    _, resume_step = relaunch_resumes(out, flags, NUM_PROCESSES="1", MASTER_PORT="29520")
    assert resume_step == 3
    worst = assert_same_steps(step_metrics(out), step_metrics(reference_run[0]))
    print(f"resumed at step {resume_step}, largest difference {worst:.3g}")
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    folders = sorted((out / "wandb").glob("offline-run-*"))  # one per launch, in start order
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    # kill -9 loses what W&B had not yet flushed of the first launch; the relaunch continues the same run
    records = wandb_records(folders[1])
    relaunched = next(r["run"] for r in records if r.get("type") == "run")
    assert relaunched["run_id"] == run_id and relaunched["resume"] is True
    steps = [r["history"]["item"]["train/global_step"] for r in records
             if r.get("type") == "history" and "train/loss" in r["history"]["item"]]
    assert steps == [4, 5, 6, 7]


def test_a_stop_signal_to_one_rank_checkpoints_the_step_and_the_relaunch_resumes_exactly(reference_run, tmp_path):
    """Two processes under ZeRO-2. While rank 0 is held inside step 4, SIGUSR1 (what SLURM sends ahead of a time
    limit) goes to rank 1 only: both ranks agree at the end of step 4, a complete checkpoint-4 is written, the
    launcher exits with 75 and says how to resume; the same command then resumes from checkpoint-4 and gives the
    reference's numbers."""
    out, fifo = tmp_path / "run", gates.gate(tmp_path)
    exp = experiment_with(tmp_path, gates.inside_step(4))
    flags = [*REFERENCE, "--gradient_accumulation_steps", "1"]
    env = {"NUM_PROCESSES": "2", "MASTER_PORT": "29522"}
    started = Started(["bash", LAUNCH, exp, *flags], OUTPUT_DIR=str(out), GATE=str(fifo), **env)
    try:
        started.wait_for("gate: inside step 4", timeout=600)
        (rank1,) = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])
                    and "train_cluster.py" in " ".join(p.info["cmdline"]) and p.environ().get("RANK") == "1"]
        # rank 1 waits for rank 0 in step 4's gradient reduction: its handler runs once that returns, within step 4
        rank1.send_signal(signal.SIGUSR1)
        gates.release(fifo)
        code = started.finish(timeout=300)
    finally:
        started.kill()
    assert code == 75, started.output()[-3000:]
    step = max(c.global_step for c in checkpoints.find_checkpoints(out, include_final=False))
    assert step == 4 and not (out / "final_adapter").exists()
    assert "rank 1: got SIGUSR1; stopping at the end of this optimizer step with a checkpoint" in started.output()
    assert started.lines[-1] == ("preempted: stopped for SIGUSR1 at step 4: checkpoint-4 is saved; relaunch the same "
                                 "command to resume from it (the same on ranks 0, 1)")
    _, resume_step = relaunch_resumes(out, flags, exp=exp, **env)
    assert resume_step == 4
    assert_same_steps(step_metrics(out), step_metrics(reference_run[0]))
    # one W&B run across the stop: the first launch's steps up to 4 (it was closed cleanly), the relaunch's after
    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    steps = [[r["history"]["item"]["train/global_step"] for r in wandb_records(f)
              if r.get("type") == "history" and "train/loss" in r["history"]["item"]] for f in folders]
    assert steps == [[1, 2, 3, 4], [5, 6, 7]]


def test_save_every_minutes_adds_checkpoints_by_wall_time(tmp_path, tiny_dir):
    """save_every_minutes 0.0001 (6 ms, less than any optimizer step here): a checkpoint at the end of every step,
    although save_steps (1000) would save only at the end."""
    out = tmp_path / "run"
    proc = run(["bash", TRAIN, *REFERENCE, "--save_steps", "1000", "--save_every_minutes", "0.0001", "--report_to",
                "none", "--eval_strategy", "no"], OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [c.global_step for c in checkpoints.find_checkpoints(out, include_final=False)] == list(range(1, 8))


def test_incomplete_checkpoints_are_skipped_by_resume_and_listing(reference_run, tmp_path):
    """A run that crashed before its final adapter, with checkpoint-7 truncated and checkpoint-6 interrupted before
    its manifest: resume takes checkpoint-3, naming what is wrong with the others."""
    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out, symlinks=True)
    shutil.rmtree(out / "final_adapter")
    weights = out / "checkpoint-7" / layout.ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a crash mid-write
    (out / "checkpoint-6" / layout.MANIFEST).unlink()  # save interrupted before the marker
    warnings: list[str] = []
    assert checkpoints.latest_resumable(out, warn=warnings.append).global_step == 3
    assert warnings == [f"skipping {out / 'checkpoint-6'}: manifest.json is missing (the save did not finish)",
                        f"skipping {out / 'checkpoint-7'}: adapter_model.safetensors has 100 bytes, manifest.json says "
                        f"{json.loads((out / 'checkpoint-7' / 'manifest.json').read_text())['files'][layout.ADAPTER_WEIGHTS]['size']} "
                        f"(truncated or altered)"]
    proc, resume_step = relaunch_resumes(out, REFERENCE)
    assert resume_step == 3
    assert warnings[0] in proc.stdout and warnings[1] in proc.stdout


def _train_py(args: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN_PY), "--config", str(CONFIG), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env))


def test_bad_record_stops_before_the_model_loads(tmp_path, tiny_dir):
    good = [json.loads(line) for line in (tiny_dir / "data" / "train.jsonl").read_text().splitlines()[2:6]]
    bad = write_jsonl(tmp_path / "train.jsonl", [good[0], good[1], {"document": "text", "summary": 7}, good[2]])
    out = tmp_path / "out"
    proc = _train_py(["--train_file", str(bad), "--output_dir", str(out), "--report_to", "none"])
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-2:] == [
        f"error: {bad}: 1 unusable record of 4; fix it, or set on_bad_record: skip to train without it (they are "
        f"then listed in OUTPUT_DIR/bad_records.jsonl)", f"  {bad}:3: field 'summary' must be a string, got int."]
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
    # not do: record text is tokenized as plain text, longctx.data.chat.)
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
        tensors = load_file(c.path / layout.ADAPTER_WEIGHTS)
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
    assert (tmp_path / "o" / "final_adapter" / layout.MANIFEST).is_file()  # the save itself had finished


def test_hang_in_the_last_checkpoint_save_is_cut_by_the_end_of_run_watchdog(tmp_path, tiny_dir):
    """The Trainer writes its last checkpoint inside train(), after the last step: the end-of-run guard is armed
    by then. 6 records (2 dropped), accumulation 2: 2 optimizer steps; the save at step 2 hangs."""
    patch = ("from longctx.training.callbacks import ManifestCallback\n"
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
    patch = ("from longctx.training.trainer import LongContextTrainer\n"
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
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    every_rank = " \\(the same on ranks 0, 1\\)" if processes == "2" else ""
    assert re.fullmatch(r"error: non-finite gradient norm at step 3 \(this process: (inf|nan)\); stopped before the "
                        r"optimizer step, so no checkpoint holds it\. Lower learning_rate, check the data around this "
                        r"step, or resume from the last checkpoint\." + every_rank,
                        proc.stderr.splitlines()[-1]), proc.stderr[-3000:]
    saved = checkpoints.find_checkpoints(out, include_final=True)
    assert [c.name for c in saved] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "checkpoint-3").exists() and not (out / "final_adapter").exists()
    for c in saved:
        assert all(torch.isfinite(t).all() for t in load_file(c.path / layout.ADAPTER_WEIGHTS).values())


def test_final_adapter_manifest_and_altered_adapter_refused(tmp_path, tiny_dir):
    out = tmp_path / "out"
    proc = _train_py(["--output_dir", str(out), "--max_train_samples", "4", "--num_train_epochs", "1",
                      "--save_steps", "100", "--eval_steps", "100", "--report_to", "none"],
                     WANDB_API_KEY="sk-test-SECRET123", HF_TOKEN="hf_SECRET456", WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SECRET123" not in proc.stdout + proc.stderr and "SECRET456" not in proc.stdout + proc.stderr
    final = out / "final_adapter"
    manifest = json.loads((final / layout.MANIFEST).read_text())
    assert manifest["global_step"] == 1 and len(manifest["git_commit"] or "") == 40
    weights = manifest["files"][layout.ADAPTER_WEIGHTS]
    assert weights["size"] == (final / layout.ADAPTER_WEIGHTS).stat().st_size and len(weights["sha256"]) == 64
    assert checkpoints.adapter_problem(final) is None

    data = bytearray((final / layout.ADAPTER_WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # same size, one byte altered
    (final / layout.ADAPTER_WEIGHTS).write_bytes(bytes(data))
    assert "does not match its sha256" in checkpoints.adapter_problem(final)
    proc = subprocess.run([sys.executable, str(EVAL_PY_000),
                           "--config", str(CONFIG), "--checkpoint", str(final), "--report_to", "none"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 2 and "does not match its sha256" in proc.stderr


def test_no_unsafe_loading_in_the_code():
    """torch.load only with weights_only=True; trust_remote_code only from the setting (default off)."""
    from longctx.settings import ModelArguments

    assert ModelArguments().trust_remote_code is False
    for path in (REPO_ROOT / "longctx").rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "trust_remote_code=True" not in text, path.name
