"""Preemption and time limits: stop at an optimizer-step boundary, with a complete checkpoint of that step.

A scheduler warns a job before it takes the GPUs back: SLURM sends SIGUSR1 ahead of the time limit (`--signal`)
and SIGTERM on preemption; a terminal's Ctrl-C sends SIGINT. Every training process catches all three and only notes
the request (a second SIGINT, a second Ctrl-C, stops the process at once: the step in progress is lost, the last
complete checkpoint stays). At the end of the
optimizer step in progress all ranks all-reduce their requests, so they agree on the same step even when one rank
alone was signalled; the Trainer then saves a complete checkpoint of that step (manifest included) and stops, and
every process exits with status 75 (longctx.exit_status.PREEMPTED), which the SLURM script turns into a requeue.
Relaunching the same command resumes from that checkpoint. At 262,144 tokens a step takes tens of minutes: the
signal must come that long (plus a save) before the deadline.

`save_every_minutes` adds checkpoints by wall time, agreed the same way, on top of save_steps.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..errors import Preempted
from ..run.layout import checkpoint_name
from ..utils.distributed import rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOPPED_AT_ONCE = 130  # a second Ctrl-C: the shell's status for a process ended by SIGINT


class PreemptionCallback(TrainerCallback):
    def __init__(self, save_every_minutes: float | None = None):
        self.save_every_seconds = 60.0 * save_every_minutes if save_every_minutes else None
        self.requested: signal.Signals | None = None
        self.stopped_at_step: int | None = None
        self.agreed: signal.Signals | None = None  # the signal every rank stops for
        self.last_save = time.monotonic()

    def install(self) -> None:
        """Catch SIGTERM, SIGUSR1 and SIGINT in this process (the main thread, before training starts)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)

    def _note(self, signum: int, _frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum)
            print(f"rank {rank()}: got {self.requested.name}; stopping at the end of this optimizer step with a "
                  f"checkpoint", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT:  # Ctrl-C again: the user will not wait for the step
            print(f"rank {rank()}: got SIGINT again; stopping at once, without a checkpoint of this step",
                  file=sys.stderr, flush=True)
            os._exit(STOPPED_AT_ONCE)

    def on_step_end(self, args, state, control, **kwargs):
        due = self.save_every_seconds is not None and time.monotonic() - self.last_save >= self.save_every_seconds
        # [the signal requested (0: none), wall-time save due], agreed by every rank (max over ranks), so every rank
        # stops at this step and names the same signal
        flags = torch.tensor([float(self.requested or 0), float(due)], device=args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, save = int(flags[0].item()), bool(flags[1].item())
        if signum:
            self.agreed = signal.Signals(signum)
            control.should_save = True
            control.should_evaluate = False  # the deadline is near: the checkpoint first, evaluation after resume
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
        elif save:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()

    def outcome(self) -> Preempted | None:
        if self.stopped_at_step is None:
            return None
        return Preempted(f"stopped for {self.agreed.name} at step {self.stopped_at_step}: "
                         f"{checkpoint_name(self.stopped_at_step)} is saved; relaunch the same command to resume from "
                         f"it", self.agreed.name)
