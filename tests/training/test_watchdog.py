"""longctx.training.watchdog: a faulthandler timer that writes every thread's stack and exits when a guarded section
runs past its time, even inside a blocking call where no Python code runs; announced once per section; disarmed, it
never fires. Each case runs in its own process (the timer ends the process it fires in)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from longctx.training.watchdog import Watchdog
from support.env import subprocess_env
from support.paths import REPO_ROOT

PROGRAM = """
import threading, sys
from longctx.training.watchdog import Watchdog
dog = Watchdog({seconds}, "step_timeout_seconds")
dog.arm("each optimizer step")
dog.arm("each optimizer step")  # the same section again: announced once
{after_arm}
threading.Event().wait({block})  # stuck in a blocking call (as in a collective), or a section that ends
print("section ended", flush=True)
"""


def run_program(seconds: float, block: float, after_arm: str = "") -> subprocess.CompletedProcess:
    code = PROGRAM.format(seconds=seconds, block=block, after_arm=after_arm)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)


def test_a_section_past_its_time_writes_every_stack_and_exits():
    proc = run_program(seconds=1, block=60)
    assert proc.returncode == 1 and "section ended" not in proc.stdout
    announcement = ("watchdog: each optimizer step must finish within 1 s (step_timeout_seconds), or every thread's "
                    "stack is written to the log and the process exits")
    assert proc.stderr.count(announcement) == 1
    assert "Timeout (0:00:01)!" in proc.stderr and 'File "<string>", line 8 in <module>' in proc.stderr


def test_a_disarmed_watchdog_lets_a_longer_section_end():
    proc = run_program(seconds=1, block=3, after_arm="dog.disarm()\nassert dog.armed_for is None")
    assert (proc.returncode, proc.stdout) == (0, "section ended\n")
    assert "Timeout" not in proc.stderr


def test_no_time_set_means_no_guard(capsys):
    dog = Watchdog(None, "watchdog_timeout_seconds")
    dog.arm("the end of the run")
    assert dog.armed_for is None and capsys.readouterr().err == ""


@pytest.fixture(autouse=True)
def no_timer_left_behind():
    yield
    import faulthandler

    faulthandler.cancel_dump_traceback_later()
