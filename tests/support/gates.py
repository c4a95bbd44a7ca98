"""Holding a launched run at a chosen point, without sleeps: the experiment's train_cluster.py (support.launching.
experiment_with) patches one function so that global rank 0 prints `gate: <where>` and blocks opening a FIFO; the
test waits for that line, does what must happen at that point (a signal, a second launch, a kill), and releases
the run by opening the FIFO for writing (or never does). Launched without GATE in its environment (a relaunch),
the same experiment runs ungated."""

from __future__ import annotations

import os
from pathlib import Path

PRELUDE = """
import os
import longctx.train
from longctx.training.trainer import LongContextTrainer

def wait_at_gate(where):
    if os.environ.get("RANK", "0") == "0" and os.environ.get("GATE"):  # no GATE (a relaunch): no gate
        print(f"gate: {where}", flush=True)
        open(os.environ["GATE"]).read()
"""

BEFORE_MODEL = PRELUDE + """
_build = longctx.train.build_model
def gated(settings):
    wait_at_gate("before the model")
    return _build(settings)
longctx.train.build_model = gated
"""


def inside_step(step: int) -> str:
    """The prelude that holds rank 0 at the start of optimizer step `step` (its first micro-batch), once: a resumed
    run that starts past it passes freely."""
    return PRELUDE + f"""
_step = LongContextTrainer.training_step
_held = []
def gated(self, *args, **kwargs):
    if self.state.global_step == {step - 1} and not _held:
        _held.append(True)
        wait_at_gate("inside step {step}")
    return _step(self, *args, **kwargs)
LongContextTrainer.training_step = gated
"""


def gate(tmp_path: Path) -> Path:
    """The FIFO a gated run blocks on (pass it as the environment variable GATE)."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    return fifo


def release(fifo: Path) -> None:
    """Lets the run held at the gate go on (its open for reading returns, then its read sees the end)."""
    with open(fifo, "w"):
        pass
