"""longctx.training.preemption: SIGTERM / SIGUSR1 noted, never acted on mid-step; at the end of the optimizer step
every rank agrees (all-reduce) to save and stop, even when one rank alone was signalled; wall-time saves agreed the
same way. Two-rank cases run in a real gloo process group (support.processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from longctx.errors import Preempted
from longctx.training import preemption
from longctx.training.preemption import PreemptionCallback
from support.env import subprocess_env
from support.paths import REPO_ROOT
from support.processes import run_ranks

ARGS = SimpleNamespace(device="cpu")


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_is_noted_once_and_acted_on_at_the_end_of_the_step(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    callback = PreemptionCallback()
    callback.install()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing: the first is the request
    assert callback.requested == signal.SIGUSR1 and callback.outcome() is None  # nothing stopped mid-step
    control = callback.on_step_end(ARGS, TrainerState(global_step=7), TrainerControl(should_evaluate=True))
    assert (control.should_save, control.should_training_stop, control.should_evaluate) == (True, True, False)
    stop = callback.outcome()
    assert isinstance(stop, Preempted)
    assert str(stop) == ("stopped for SIGUSR1 at step 7: checkpoint-7 is saved; relaunch the same command to "
                         "resume from it")
    assert capsys.readouterr().err == ("rank 0: got SIGUSR1; stopping at the end of this optimizer step with a "
                                       "checkpoint\n")


def test_without_a_signal_saves_come_every_save_every_minutes(monkeypatch):
    now = iter([0.0, 60.0, 179.0, 180.0, 181.0])  # created at t=0; steps end at 60 s, 179 s, 180 s; saved at 181 s
    monkeypatch.setattr(preemption.time, "monotonic", lambda: next(now))
    callback = PreemptionCallback(save_every_minutes=3)
    saves = [callback.on_step_end(ARGS, TrainerState(global_step=step), TrainerControl()).should_save
             for step in (1, 2, 3)]
    assert saves == [False, False, True]  # 180 s = 3 minutes after the start
    callback.on_save(ARGS, TrainerState(global_step=3), TrainerControl())
    assert callback.last_save == 181.0 and callback.outcome() is None


def _one_rank_signalled(rank: int, world_size: int):
    callback = PreemptionCallback()
    callback.install()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    control = callback.on_step_end(ARGS, TrainerState(global_step=12), TrainerControl())
    return control.should_save, control.should_training_stop, str(callback.outcome())


def test_every_rank_stops_at_the_same_step_for_the_same_signal_when_one_rank_was_signalled(tmp_path):
    line = "stopped for SIGTERM at step 12: checkpoint-12 is saved; relaunch the same command to resume from it"
    assert run_ranks(_one_rank_signalled, tmp_path) == [(True, True, line), (True, True, line)]


def test_ctrl_c_is_a_stop_request_and_a_second_ctrl_c_stops_at_once(tmp_path):
    """In its own process: the second SIGINT ends it (status 130, as a shell reports an interrupted program)."""
    program = (
        "import os, signal, sys\n"
        "from longctx.training.preemption import PreemptionCallback\n"
        "callback = PreemptionCallback()\n"
        "callback.install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('noted', callback.requested.name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('still running', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, env=subprocess_env(RANK="0"),
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (130, "noted SIGINT\n")
    assert proc.stderr == ("rank 0: got SIGINT; stopping at the end of this optimizer step with a checkpoint\n"
                           "rank 0: got SIGINT again; stopping at once, without a checkpoint of this step\n")
