"""longctx.training.telemetry: the eval perplexity, the tokens per second of a log row, and the peak GPU memory of a
row: the largest over every rank (two real gloo ranks), allocated and reserved, an evaluation's on its own row. CUDA's
counters are read through a reader; without a GPU here, a scripted reader stands in for torch.cuda's peaks."""

from __future__ import annotations

import math

import pytest

from longctx.training import telemetry
from support.processes import run_ranks


def test_perplexity_is_exp_of_the_loss_and_infinite_past_what_a_float_holds():
    assert telemetry.perplexity(0.0) == 1.0
    assert telemetry.perplexity(2.0) == pytest.approx(7.389056, rel=1e-6)  # e^2
    assert telemetry.perplexity(800.0) == math.inf  # e^800 overflows a double (max ~e^709.8)


def test_throughput_is_tokens_since_the_last_row_over_the_time_since_then(monkeypatch):
    clock = iter([100.0, 110.0, 112.0])  # first token at t=100; rows at t=110 and t=112
    monkeypatch.setattr(telemetry.time, "perf_counter", lambda: next(clock))
    meter = telemetry.ThroughputMeter()
    assert meter.take() is None  # nothing trained yet: no rate
    meter.add(600)
    meter.add(400)
    assert meter.take() == 100.0  # 1,000 tokens in 10 s
    meter.add(50)
    assert meter.take() == 25.0  # 50 tokens in the 2 s since the last row


def test_no_gpu_no_memory_figures():
    memory = telemetry.MemoryTelemetry()  # this machine has no CUDA device
    memory.evaluation_starts()
    assert (memory.reader, memory.training_row(), memory.evaluation_row()) == (None, None, None)


GIB = 2**30


class ScriptedGPU:
    """A rank's GPU whose peaks since the last reset are set by the test (what torch.cuda would report)."""

    def __init__(self):
        self.allocated = self.reserved = 0.0
        self.resets = 0

    def use(self, allocated_gib: float, reserved_gib: float) -> None:
        self.allocated = max(self.allocated, allocated_gib * GIB)
        self.reserved = max(self.reserved, reserved_gib * GIB)

    def peaks(self):
        return self.allocated, self.reserved

    def reset(self):
        self.allocated = self.reserved = 0.0
        self.resets += 1

    def total(self):
        return 80 * GIB


def _two_ranks_train_then_evaluate(rank: int, world_size: int):
    gpu = ScriptedGPU()
    memory = telemetry.MemoryTelemetry(gpu)
    # steps 1-10: rank 1 holds the longer sample
    gpu.use(*((10, 12) if rank == 0 else (30, 33)))
    first = memory.training_row()
    # steps 11-20, then an evaluation (rank 0 evaluates the longest sample: 50 GiB), then steps 21-30
    gpu.use(*((11, 12) if rank == 0 else (20, 24)))
    memory.evaluation_starts()
    gpu.use(*((50, 56) if rank == 0 else (35, 40)))
    evaluation = memory.evaluation_row()
    gpu.use(*((9, 12) if rank == 0 else (21, 24)))
    second = memory.training_row()
    return first[0], evaluation[0], second[0], second[1], gpu.resets


def test_rows_hold_the_largest_peak_of_every_rank_and_evaluations_their_own(tmp_path):
    first, evaluation, second, line, resets = run_ranks(_two_ranks_train_then_evaluate, tmp_path)[0]
    # rows 1: max over ranks of (10, 30) allocated and (12, 33) reserved; 33 / 80 = 41.25% -> 41.2 (round half even)
    assert first == {"gpu_mem_peak_allocated_gib": 30.0, "gpu_mem_peak_reserved_gib": 33.0, "gpu_mem_percent": 41.2}
    # the evaluation's own peak: max(50, 35), max(56, 40); 56 / 80 = 70%
    assert evaluation == {"eval_gpu_mem_peak_allocated_gib": 50.0, "eval_gpu_mem_peak_reserved_gib": 56.0,
                          "eval_gpu_mem_percent": 70.0}
    # the next training row: steps 11-30 without the evaluation: max over (11, 9, 20, 21) and (12, 12, 24, 24)
    assert second == {"gpu_mem_peak_allocated_gib": 21.0, "gpu_mem_peak_reserved_gib": 24.0, "gpu_mem_percent": 30.0}
    assert line == "gpu_mem (peak, largest of 2 rank(s)): 21.0 GiB allocated, 24.0 GiB reserved of 80 GiB (30%)"
    assert resets == 4  # after each row, and when the evaluation started
