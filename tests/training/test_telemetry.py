"""longctx.training.telemetry: the eval perplexity and the tokens per second of a log row (pure measurements)."""

from __future__ import annotations

import math

import pytest

from longctx.training import telemetry


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
    assert telemetry.gpu_memory() is None  # this machine has no CUDA device
