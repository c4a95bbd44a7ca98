"""Helpers of the evaluation tests (tests/test_eval_*.py): run the launcher, follow its output line by line, copy
and read runs. The session's real training run itself is a fixture in conftest.py (`trained_run`, `scored_run`)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

from conftest import REPO_ROOT, subprocess_env

TRAIN = REPO_ROOT / "experiments" / "000_tiny_smoke" / "launch_train.sh"
EVAL = REPO_ROOT / "experiments" / "000_tiny_smoke" / "eval_all_checkpoints.sh"
# 12 records (2 too long -> dropped) -> 5 optimizer steps; no warmup so that the later checkpoints already write text.
QUICK_TRAINING = ["--max_train_samples", "12", "--max_eval_samples", "4", "--num_train_epochs", "1",
                  "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--warmup_steps", "0"]
NAMES = ["checkpoint-2", "checkpoint-4", "checkpoint-5", "final_adapter"]
# Batches of 2 of the 4 validation prompts: with 2 processes each generates one batch.
SCORE_FLAGS = ["--report_to", "none", "--generation_batch_size", "2"]
EVAL_OUTPUTS = ("eval_results.jsonl", "eval_summary.md", "rouge_by_step.png", "rouge_by_step.csv", "loss_curve.png",
                "loss_curve.csv", "best_checkpoint", "eval_predictions.jsonl")


def run(cmd: list, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


class Started:
    """A process started in its own session (so its whole group can be killed), stdout and stderr merged. A
    thread reads its output line by line into a queue, so a test waits for the line that announces an event
    (blocked on the queue, with a timeout) instead of sleeping or polling files."""

    def __init__(self, cmd: list, **env: str):
        self.proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO_ROOT, env=subprocess_env(**env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)  # end of output: the process closed its side of the pipe

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line (from here on) that contains `text`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout} s:\n" + self.output()[-3000:]) from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"the process ended without a line with {text!r}:\n" + self.output()[-3000:])
            self.lines.append(line)
            if text in line:
                return line

    def finish(self, timeout: float) -> int:
        """Waits for the end of the output and the exit; returns the exit status."""
        deadline = time.monotonic() + timeout
        while (line := self._queue.get(timeout=max(deadline - time.monotonic(), 0))) is not None:
            self.lines.append(line)
        self._queue.put(None)
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)

    def output(self) -> str:
        return "\n".join(self.lines)


def copy_run(src: Path, dst: Path, without: tuple[str, ...] = ()) -> Path:
    """A fresh copy of a run without evaluation outputs (and without the named entries)."""
    shutil.copytree(src, dst, symlinks=True, ignore=lambda _d, names: [n for n in names
                                                                      if n in EVAL_OUTPUTS or n in without])
    return dst


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval_results.jsonl").read_text().splitlines()]


def predictions_of(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "eval_predictions.jsonl").read_text().splitlines()]


def line_count(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.is_file() else 0


def inprocess(run_dir: Path, *flags: str) -> int:
    """The evaluation's main in this process (repository root as working directory); returns the exit status."""
    from longctx.eval import cli

    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        cli.main(["--config", str(run_dir / "run_config.yaml"), "--run_dir", str(run_dir), "--all_checkpoints",
                  "--report_to", "none", *flags])
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        os.chdir(cwd)
