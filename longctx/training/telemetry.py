"""What the training log carries beyond the Trainer's own fields: tokens per second, peak GPU memory and the eval
perplexity. Pure measurements; `longctx.training.trainer` puts them into each log row."""

from __future__ import annotations

import math
import time

import torch


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
