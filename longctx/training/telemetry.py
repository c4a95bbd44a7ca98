"""What the training log carries beyond the Trainer's own fields: tokens per second, the peak GPU memory and the eval
perplexity. `longctx.training.trainer` puts them into each log row.

GPU memory: each row holds the peak since the previous row, allocated (what tensors use) and reserved (what the
caching allocator holds: what actually runs out), as the largest over every rank (ranks hold samples of different
lengths; rank 0's alone says nothing of the others). An evaluation has its own peak, on its own row
(eval_gpu_mem_*): measured from the evaluation's start and reset after it, so it never lands on the next training
row (under sequence parallelism an evaluation runs whole sequences, and is often the largest). Sizes in GiB.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

GIB = 2**30


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class CudaMemory:
    """This process's GPU: peaks since the last reset, and the device's size."""

    def peaks(self) -> tuple[float, float]:
        return float(torch.cuda.max_memory_allocated()), float(torch.cuda.max_memory_reserved())

    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def total(self) -> float:
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


class MemoryTelemetry:
    """Peak GPU memory per log row, the largest over every rank; an evaluation's peak on its own row. `reader`:
    CudaMemory (None without CUDA: no rows get memory fields). Every rank calls every method at the same points (the
    Trainer logs on every rank): the rows are all-reduced."""

    def __init__(self, reader: CudaMemory | None = None):
        self.reader = reader if reader is not None else (CudaMemory() if torch.cuda.is_available() else None)
        self.carried = (0.0, 0.0)  # training peaks before an evaluation started, not yet logged

    def evaluation_starts(self) -> None:
        """Fold the training peaks so far into the next training row, and measure the evaluation alone."""
        if self.reader is not None:
            self.carried = tuple(map(max, self.carried, self.reader.peaks()))
            self.reader.reset()

    def training_row(self) -> tuple[dict[str, float], str] | None:
        """(fields for the log row, the console line) of the training steps since the last row, or None."""
        if self.reader is None:
            return None
        peaks = tuple(map(max, self.carried, self.reader.peaks()))
        self.carried = (0.0, 0.0)
        return self._row("", peaks)

    def evaluation_row(self) -> tuple[dict[str, float], str] | None:
        if self.reader is None:
            return None
        return self._row("eval_", self.reader.peaks())

    def _row(self, prefix: str, peaks: tuple[float, float]) -> tuple[dict[str, float], str]:
        self.reader.reset()
        allocated, reserved = largest_over_ranks(peaks)
        total = self.reader.total()
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        fields = {f"{prefix}gpu_mem_peak_allocated_gib": round(allocated / GIB, 2),
                  f"{prefix}gpu_mem_peak_reserved_gib": round(reserved / GIB, 2),
                  f"{prefix}gpu_mem_percent": round(100.0 * reserved / total, 1)}
        line = (f"{prefix}gpu_mem (peak, largest of {ranks} rank(s)): {allocated / GIB:.1f} GiB allocated, "
                f"{reserved / GIB:.1f} GiB reserved of {total / GIB:.0f} GiB ({100.0 * reserved / total:.0f}%)")
        return fields, line


def largest_over_ranks(values: tuple[float, ...]) -> tuple[float, ...]:
    """Each value's maximum over every rank (all-reduce), or the values themselves in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(tensor.tolist())


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
