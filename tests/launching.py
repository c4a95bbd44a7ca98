"""Running the real launchers from tests: an experiment folder whose train_cluster.py first applies a fault or a
probe, and waiting on a line a process prints (read from its pipe, no polling)."""

from __future__ import annotations

import re
import selectors
import shutil
import subprocess
import time
from pathlib import Path

from conftest import REPO_ROOT, subprocess_env

EXP_000 = REPO_ROOT / "experiments" / "000_tiny_smoke"
LAUNCH = REPO_ROOT / "scripts" / "launch_train.sh"


def experiment_with(tmp_path: Path, prelude: str, name: str = "exp") -> Path:
    """A copy of 000's experiment folder whose train_cluster.py runs `prelude` (Python) before longctx.train.main:
    the real launchers, accelerate and DeepSpeed run it exactly as they run 000's."""
    exp = tmp_path / name
    exp.mkdir()
    for file in ("config.yaml", "ds_config_zero2.json"):
        shutil.copy(EXP_000 / file, exp / file)
    (exp / "train_cluster.py").write_text(f"{prelude}\n\nimport longctx.train\n\nlongctx.train.main()\n")
    return exp


def launch(exp: Path, args: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """scripts/launch_train.sh on an experiment folder, to the end."""
    return subprocess.run(["bash", str(LAUNCH), str(exp), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(**env))


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    """A process in a session of its own (so its whole group can be killed), stdout and stderr in one pipe."""
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO_ROOT, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float) -> tuple[re.Match, list[str]]:
    """Read the process's output line by line until a line matches `pattern` (a regex); returns the match and the
    lines read. Fails when the process ends or `timeout` seconds pass first."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no line matching {pattern!r} within {timeout} s; last lines:\n" + "".join(lines[-30:])
        if not selector.select(left):
            continue
        line = proc.stdout.readline()
        assert line, f"the process ended (status {proc.wait()}) before printing {pattern!r}:\n" + "".join(lines[-30:])
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match, lines
