"""What the training log carries beyond the Trainer's own fields (tokens/s, GPU memory, eval perplexity), the
non-finite loss guard, checkpoint manifests and the hang watchdog."""

from __future__ import annotations

import faulthandler
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .checkpoints import write_manifest


class NonFiniteLossError(RuntimeError):
    """Raised on every rank at once (the check is all-reduced), so no rank waits forever on the others."""


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def gpu_memory() -> tuple[dict[str, float], str] | None:
    """Peak memory of this process's GPU since the last call: numbers for W&B and the line for the console,
    e.g. 'gpu_mem: 24.5GB/80GB (31%)'. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    percent = 100.0 * peak / total
    line = f"gpu_mem: {peak:.1f}GB/{total:.0f}GB ({percent:.0f}%)"
    return {"gpu_mem_peak_gib": round(peak, 2), "gpu_mem_percent": round(percent, 1)}, line


class ThroughputMeter:
    """Non-padding tokens this process trained on per second, between two log calls."""

    def __init__(self) -> None:
        self.tokens = 0
        self.since: float | None = None

    def add(self, tokens: int) -> None:
        if self.since is None:
            self.since = time.perf_counter()
        self.tokens += tokens

    def take(self) -> float | None:
        if self.since is None:
            return None
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        return rate


class Watchdog:
    """Arms faulthandler's timer: if the guarded section is still running after `seconds`, every thread's stack is
    written to stderr and the process exits with status 1. It needs no Python code to run at expiry, so it fires
    even when the process is stuck inside a collective (NCCL / gloo) or I/O."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds

    def arm(self, what: str) -> None:
        if self.seconds:
            print(f"watchdog: {what} must finish within {self.seconds:g} s, or every thread's stack is dumped "
                  f"and the process exits", file=sys.stderr, flush=True)
            faulthandler.dump_traceback_later(self.seconds, exit=True, file=sys.stderr)

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()


class StepWatchdogCallback(TrainerCallback):
    """Guards each optimizer step (forward, backward, optimizer) with the watchdog."""

    def __init__(self, seconds: float):
        self.watchdog = Watchdog(seconds)

    def on_step_begin(self, args, state, control, **kwargs):
        faulthandler.dump_traceback_later(self.watchdog.seconds, exit=True, file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        self.watchdog.disarm()


class ManifestCallback(TrainerCallback):
    """Writes checkpoint-N/manifest.json after every rank has finished writing checkpoint-N, so that resume and
    evaluation can tell a complete checkpoint from one interrupted mid-save."""

    def __init__(self, git_commit: str | None):
        self.git_commit = git_commit

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # DeepSpeed ranks write their own optimizer shards
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                write_manifest(path, state.global_step, self.git_commit)
