"""Operations that lose nothing, through the real launchers: a second launch into a live run's OUTPUT_DIR is refused
naming it (and a run killed with kill -9 does not block its relaunch); Ctrl-C to the launcher's process group, as a
terminal sends it, stops every rank at the end of its step with a checkpoint (exit 75), and a second Ctrl-C stops
them at once; OVERWRITE=1 is not carried out again by a relaunch of the same job (a SLURM requeue, or a relaunch
after the run stopped for a signal); a run that does not fit its disk is refused before it starts, and a disk that
fills up during the run ends it with one line naming the last complete checkpoint, which stays resumable."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket

import psutil
import pytest

from longctx.run import checkpoints, layout
from support import gates
from support.disk import small_disk
from support.launching import REFERENCE, Started, experiment_with, run
from support.paths import LAUNCH, REPO_ROOT
from support.paths import TRAIN_000 as TRAIN

pytestmark = pytest.mark.e2e

# The disk fills up right after checkpoint-1 is complete (rank 0 writes its manifest last), as when another job
# takes the space: the next checkpoint's writes meet the kernel's real ENOSPC.
FILL_AFTER_CHECKPOINT_1 = """
import os
from pathlib import Path
import longctx.training.callbacks as callbacks
from support.disk import fill

_write_manifest = callbacks.write_manifest
def write_then_fill(path, step, commit):
    manifest = _write_manifest(path, step, commit)
    if step == 1:
        print(f"filled the disk: {fill(Path(os.environ['FILLER']))} bytes", flush=True)
    return manifest
callbacks.write_manifest = write_then_fill
"""


def kill_run(out) -> None:
    """kill -9 of every process of this run, as a scheduler would (torch's agent starts ranks in sessions of
    their own)."""
    for proc in psutil.process_iter(["cmdline"]):
        if str(out) in " ".join(proc.info["cmdline"] or []):
            proc.kill()


def test_a_second_launch_into_a_live_run_is_refused_and_a_kill_9_of_the_run_blocks_no_relaunch(tmp_path, tiny_dir):
    out, fifo = tmp_path / "run", gates.gate(tmp_path)
    exp = experiment_with(tmp_path, gates.BEFORE_MODEL)
    flags = ["--max_train_samples", "8", "--num_train_epochs", "1", "--report_to", "none"]
    first = Started(["bash", LAUNCH, exp, *flags], OUTPUT_DIR=str(out), GATE=str(fifo))
    try:
        first.wait_for("gate: before the model", timeout=300)
        second = run(["bash", TRAIN, *flags], OUTPUT_DIR=str(out))
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        (rank0,) = [p for p in psutil.process_iter(["cmdline"])
                    if "train_cluster.py" in " ".join(p.info["cmdline"] or []) and str(out) in
                    " ".join(p.info["cmdline"])]
        assert re.fullmatch(
            rf"error: OUTPUT_DIR {re.escape(str(out))} is in use by a live run: host {re.escape(socket.gethostname())}"
            rf", process {rank0.pid}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(last heartbeat \d+ s ago\); wait "
            rf"for it to end or stop it, or choose another OUTPUT_DIR \(a run that died without ending frees it 120 s "
            rf"after its last heartbeat\)\.\n", second.stderr)
    finally:  # then the live run is killed with kill -9: its lease stays behind, held by a dead process
        first.kill()
        kill_run(out)
    assert (out / layout.RUN_LOCK).is_file()
    relaunch = run(["bash", TRAIN, *flags], OUTPUT_DIR=str(out))
    assert relaunch.returncode == 0, relaunch.stdout[-2000:] + relaunch.stderr[-2000:]
    assert f"OUTPUT_DIR {out}: the lease of a run that ended without releasing it (host " in relaunch.stdout
    assert (out / "final_adapter").is_dir() and not (out / layout.RUN_LOCK).exists()  # released at its end


def test_ctrl_c_checkpoints_the_step_and_exits_75_and_a_relaunch_with_overwrite_resumes_it(tmp_path, tiny_dir):
    """SIGINT to the launcher's process group, as a terminal's Ctrl-C, while rank 0 is held inside step 4: both
    ranks stop at the end of step 4 with a complete checkpoint; the launcher says how to resume and exits 75. Then a
    wrapper relaunches the same command, OVERWRITE=1 in it: it is not carried out, the run resumes from checkpoint-4
    and finishes. (The SLURM requeue, the other relaunch of the same job, is the sbatch test below.)"""
    out, fifo = tmp_path / "run", gates.gate(tmp_path)
    exp = experiment_with(tmp_path, gates.inside_step(4))
    flags = [*REFERENCE, "--gradient_accumulation_steps", "1"]
    env = {"OUTPUT_DIR": str(out), "NUM_PROCESSES": "2", "MASTER_PORT": "29571"}
    started = Started(["bash", LAUNCH, exp, *flags], GATE=str(fifo), **env)
    try:
        started.wait_for("gate: inside step 4", timeout=600)
        os.killpg(started.proc.pid, signal.SIGINT)
        started.wait_for("rank 0: got SIGINT; stopping at the end of this optimizer step with a checkpoint", 60)
        gates.release(fifo)
        code = started.finish(timeout=300)
    finally:
        started.kill()
    assert code == 75, started.output()[-3000:]
    assert json.loads((out / layout.PREEMPTED).read_text())["step"] == 4
    assert (out / "checkpoint-4" / layout.MANIFEST).is_file() and not (out / "checkpoint-5").exists()
    assert ("Ctrl-C: every rank stops at the end of its optimizer step with a checkpoint (exit 75); Ctrl-C again "
            "stops them at once, losing the step in progress.") in started.lines
    assert started.lines[-1] == ("preempted: stopped for SIGINT at step 4: checkpoint-4 is saved; relaunch the same "
                                 "command to resume from it (the same on ranks 0, 1)")

    relaunch = run(["bash", LAUNCH, exp, *flags], OVERWRITE="1", **env)
    assert relaunch.returncode == 0, relaunch.stdout[-3000:] + relaunch.stderr[-3000:]
    assert relaunch.stdout.count("OVERWRITE=1 not applied") == 1
    assert (f"OVERWRITE=1 not applied: the run stopped for SIGINT at step 4 with a checkpoint ({layout.PREEMPTED}), "
            f"and this relaunch resumes it; to start afresh, choose another OUTPUT_DIR or delete it") in relaunch.stdout
    assert re.search(r"resuming from \S+checkpoint-4 \(step 4\)", relaunch.stdout)
    assert (out / "checkpoint-3").is_dir() and (out / "final_adapter").is_dir()
    assert not (out / layout.PREEMPTED).exists()  # finished: its next launch is a new decision
    assert not (out / layout.RUN_LOCK).exists()  # the lease is released at the end


def test_a_second_ctrl_c_stops_every_rank_at_once(tmp_path, tiny_dir):
    """Rank 0 is held inside step 3 (the step cannot end): the first Ctrl-C is noted, the second ends every process
    of the run at once with exit 130; checkpoint-2, the last complete one, stays."""
    out, fifo = tmp_path / "run", gates.gate(tmp_path)
    exp = experiment_with(tmp_path, gates.inside_step(3))
    flags = [*REFERENCE, "--gradient_accumulation_steps", "1", "--save_steps", "2"]
    started = Started(["bash", LAUNCH, exp, *flags], OUTPUT_DIR=str(out), GATE=str(fifo), NUM_PROCESSES="2",
                      MASTER_PORT="29572")
    try:
        started.wait_for("gate: inside step 3", timeout=600)
        os.killpg(started.proc.pid, signal.SIGINT)
        started.wait_for("Ctrl-C: every rank stops", timeout=60)
        os.killpg(started.proc.pid, signal.SIGINT)
        code = started.finish(timeout=60)
    finally:
        started.kill()
    assert code == 130, started.output()[-3000:]
    assert started.lines[-1] == ("error: stopped at once by a second Ctrl-C; the step in progress is lost, the last "
                                 "complete checkpoint stays: relaunch the same command to resume from it")
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert (out / "checkpoint-2" / layout.MANIFEST).is_file() and not (out / "checkpoint-3").exists()


def unfinished_copy(reference_run, tmp_path):
    """The reference run (checkpoints 3, 6, 7) without its final adapter and checkpoint-7: resumable from 6."""
    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out, symlinks=True)
    shutil.rmtree(out / "final_adapter")
    shutil.rmtree(out / "checkpoint-7")
    return out


SRUN = """#!/usr/bin/env bash
# srun stand-in (SLURM cannot run here): the task once, on this one node
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: the allocation is this machine; a requeue is recorded
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  "requeue "*) echo "requeue $2" >> "$SLURM_RECORD" ;;
esac
"""


def test_a_requeued_sbatch_job_submitted_with_overwrite_resumes_instead(reference_run, tmp_path):
    """The sbatch path: scripts/slurm_train.sh (every experiment's sbatch body) run as SLURM reruns a requeued job,
    with the original submission's environment (OVERWRITE=1) and SLURM_RESTART_COUNT=1."""
    out = unfinished_copy(reference_run, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_RECORD": str(tmp_path / "record"), "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_RESTART_COUNT": "1",
           "OVERWRITE": "1", "OUTPUT_DIR": str(out)}
    proc = run(["bash", REPO_ROOT / "scripts" / "slurm_train.sh", "experiments/000_tiny_smoke", *REFERENCE], **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "job 77: 1 node(s), machine 0 at 127.0.0.1:29500 (restart 1)" in proc.stdout
    assert ("OVERWRITE=1 not applied: this is restart 1 of SLURM job 77: the run it started resumes; to start afresh, "
            "choose another OUTPUT_DIR or delete it") in proc.stdout
    assert re.search(r"resuming from \S+checkpoint-6 \(step 6\)", proc.stdout)
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-6").is_dir() and (out / "final_adapter").is_dir()


def test_a_run_that_does_not_fit_its_disk_is_refused_before_it_starts(tmp_path, tiny_dir):
    with small_disk(tmp_path / "disk", 16) as disk:
        out = disk / "run"
        proc = run(["bash", TRAIN, "--max_train_samples", "8", "--report_to", "none"], OUTPUT_DIR=str(out))
        written = sorted(p.name for p in disk.iterdir())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # 16 MiB free is less than the W&B / report files alone (64 MiB assumed), whatever the checkpoints take
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: OUTPUT_DIR {out} is on a filesystem with 16.0 MiB free ({disk}), and the run "
                           f"writes "), line
    assert line.endswith("; free space, point OUTPUT_DIR elsewhere, or save less (save_total_limit, save_steps, "
                         "save_only_model)."), line
    assert written == [] and "Traceback" not in proc.stderr


def test_a_disk_that_fills_up_mid_run_ends_it_naming_the_last_checkpoint_which_stays_resumable(tmp_path, tiny_dir):
    # 8 records; the first two are dropped (their documents alone are 1,732 and 1,722 tokens of the tiny tokenizer,
    # over max_seq_length 1,024); 6 left, 2 per optimizer step (gradient_accumulation_steps 2): 3 steps, a
    # checkpoint after each
    flags = ["--max_train_samples", "8", "--max_eval_samples", "2", "--num_train_epochs", "1", "--save_steps", "1",
             "--eval_steps", "100", "--report_to", "none"]
    exp = experiment_with(tmp_path, FILL_AFTER_CHECKPOINT_1)
    with small_disk(tmp_path / "disk", 128) as disk:
        out, filler = disk / "run", disk / "filler"
        full = run(["bash", LAUNCH, exp, *flags], OUTPUT_DIR=str(out), FILLER=str(filler),
                   PYTHONPATH=str(REPO_ROOT / "tests"))
        assert full.returncode == 1, full.stdout[-3000:] + full.stderr[-3000:]
        checkpoint_1 = out / "checkpoint-1"
        size = sum(f.stat().st_size for f in checkpoint_1.rglob("*") if f.is_file())  # summed here
        last = full.stderr.strip().splitlines()[-1]
        assert re.fullmatch(
            re.escape(f"error: OUTPUT_DIR {out} is full (0.0 MiB free on {out}) while writing checkpoint-2 "
                      f"(removed: incomplete, ") + r"[0-9.]+ MiB" + re.escape(
                f" written): the last complete checkpoint is checkpoint-1 ({size / 2**20:.1f} MiB): free space and "
                f"relaunch the same command to resume from it; the run plan's disk line says what the run needs"),
            last), last
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
        # intact (every file's size and sha256 as its manifest lists them) and what the relaunch resumes from (the
        # resume itself from a complete checkpoint: tests/test_faults.py)
        assert checkpoints.manifest_problem(checkpoint_1) is None
        assert checkpoints.latest_resumable(out).path == checkpoint_1
