"""Running the real launchers from tests: to the end (`run`), or started and followed line by line (`Started`: a
test waits for the line that announces an event, never sleeps or polls); an experiment folder whose
train_cluster.py first applies a fault or a probe (`experiment_with`); and an offline W&B run read back
(`wandb_records`)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

from .env import subprocess_env
from .paths import EXP_000, LAUNCH, REPO_ROOT

# The reference run (session fixture `reference_run`): 16 records of 000, the first 2 too long (dropped), so 14
# samples; gradient accumulation 2 (000's default): 7 optimizer steps, a loss and grad_norm logged at each,
# checkpoints at 3, 6, 7 and an eval at the same steps; fp32 with deterministic algorithms. Other runs that must
# give the same numbers (more processes, machines, a resume) are compared with it.
REFERENCE = ["--max_train_samples", "16", "--max_eval_samples", "4", "--num_train_epochs", "1", "--save_steps", "3",
             "--eval_steps", "3", "--logging_steps", "1", "--full_determinism", "true"]


def run(cmd: list, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """A command from the repository root with the tests' environment (offline, one thread per process)."""
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


def experiment_with(tmp_path: Path, prelude: str, name: str = "exp") -> Path:
    """A copy of 000's experiment folder whose train_cluster.py runs `prelude` (Python) before longctx.train.main:
    the real launchers, accelerate and DeepSpeed run it exactly as they run 000's."""
    exp = tmp_path / name
    exp.mkdir()
    for file in ("config.yaml", "ds_config_zero2.json"):
        shutil.copy(EXP_000 / file, exp / file)
    (exp / "train_cluster.py").write_text(f"{prelude}\n\nimport longctx.train\n\nlongctx.train.main()\n")
    return exp


def launch_experiment(exp: Path, args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """scripts/launch_train.sh on an experiment folder, to the end."""
    return run(["bash", LAUNCH, exp, *args], timeout=timeout, **env)


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of an offline W&B run folder, read back with `wandb leet inspect --json`."""
    proc = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                          timeout=120, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def step_metrics(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) from the newest checkpoint's trainer_state.json (the whole run's log history)."""
    from longctx.run import checkpoints

    last = checkpoints.find_checkpoints(run_dir, include_final=False, warn=lambda _: None)[-1]
    history = checkpoints.read_trainer_state(last.path)["log_history"]
    return {row["step"]: (row["loss"], row["grad_norm"]) for row in history if "loss" in row}


def assert_same_steps(got: dict, expected: dict, atol: float = 1e-5) -> float:
    """The same steps with the same loss and grad_norm (to atol); returns the largest difference seen."""
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    worst = 0.0
    for step in expected:
        for name, a, b in zip(("loss", "grad_norm"), got[step], expected[step]):
            assert abs(a - b) <= atol, f"step {step}: {name} {a} vs {b}"
            worst = max(worst, abs(a - b))
    return worst
