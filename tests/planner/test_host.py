"""longctx.planner.host: the pinned host memory of activation offload, torch's rounding and caching as configured,
the comparison with the machine's memory (the stop with exit 3), and, where CUDA is present, the pinned bytes
torch really takes against the plan.

A Qwen3-4B layer input at 262,144 tokens is 262,144 x 2,560 x 2 bytes = 1,342,177,280 (1.25 GiB); at 200,000
tokens 1,024,000,000 (0.95 GiB). 36 layers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from longctx import exit_status
from longctx.planner import cli
from longctx.planner.host import (
    PinnedAllocator,
    allocator_settings,
    available_host_memory_gib,
    host_memory,
    pinned_block_bytes,
)
from support import paths
from support.env import subprocess_env

CONFIG_009 = str(paths.CONFIG_009)
AT_262K, AT_200K = 1_342_177_280, 1_024_000_000
GIB, MIB = 2**30, 2**20


@pytest.fixture(autouse=True)
def no_allocator_or_launch_settings(monkeypatch):
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "NUM_PROCESSES", "NUM_MACHINES"):
        monkeypatch.delenv(name, raising=False)


def test_pinned_blocks_round_up_to_a_power_of_two():
    assert pinned_block_bytes(AT_262K) == 2**31           # 1.25 GiB -> 2 GiB
    assert pinned_block_bytes(AT_200K) == 2**30           # 0.95 GiB -> 1 GiB
    assert pinned_block_bytes(2**30) == 2**30             # a power of two stays
    assert pinned_block_bytes(2**30 + 1) == 2**31
    assert pinned_block_bytes(1) == 1


def test_one_sample_length_72_gib_per_process_288_per_machine():
    # 36 x 2 GiB = 72 GiB per process; 4 processes: 288 GiB, + 4 GiB each for the process itself: 304 GiB
    host = host_memory(36, [AT_262K], 4, PinnedAllocator())
    assert host.pinned_per_process == 72 * GIB
    assert host.per_machine == 4 * (72 + 4) * GIB


def test_each_power_of_two_class_keeps_its_own_cached_blocks():
    # samples of 200,000 and of 262,144 tokens: blocks of 1 GiB and 2 GiB, each class cached for the rest of the run
    # (one free list per power of two): 36 x (1 + 2) = 108 GiB per process; 4 x (108 + 4) = 448 GiB per machine
    host = host_memory(36, [AT_200K, AT_262K, AT_262K], 4, PinnedAllocator())
    assert host.blocks == {AT_200K: 2**30, AT_262K: 2**31}
    assert host.pinned_per_process == 108 * GIB and host.per_machine == 448 * GIB


def test_the_allocator_settings_remove_the_waste():
    # pinned_max_cached_size_mb:64: blocks over 64 MiB are neither rounded nor cached: only one sample's set is
    # alive, the largest: 36 x 1.25 GiB = 45 GiB
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:True,roundup_power2_divisions:[256:1,>:4],"
                                 "pinned_max_cached_size_mb:64"}
    assert allocator_settings(env) == ({"expandable_segments": "True", "roundup_power2_divisions": "[256:1,>:4]",
                                        "pinned_max_cached_size_mb": "64"}, "PYTORCH_ALLOC_CONF")
    uncached = PinnedAllocator.from_environment(env)
    assert uncached.setting == "PYTORCH_ALLOC_CONF=pinned_max_cached_size_mb:64"
    assert host_memory(36, [AT_200K, AT_262K], 4, uncached).pinned_per_process == 45 * GIB
    # pinned_max_round_threshold_mb alone (read from the older variable too): unrounded, but cached per class:
    # 36 x (1,024,000,000 + 1,342,177,280) = 85,182,382,080 bytes
    unrounded = PinnedAllocator.from_environment({"PYTORCH_CUDA_ALLOC_CONF": "pinned_max_round_threshold_mb:512"})
    assert unrounded.round_threshold_bytes == 512 * MIB and unrounded.caches(AT_262K)
    assert host_memory(36, [AT_200K, AT_262K], 4, unrounded).pinned_per_process == 85_182_382_080
    # below the threshold a block is still rounded: 300 MiB -> 512 MiB
    assert unrounded.block_bytes(300 * MIB) == 512 * MIB


def test_not_enough_host_memory_stops_with_3_and_the_fixes(capsys):
    # 009 on 4 GPUs, samples planned at 200,000 tokens and max_seq_length 262,144: 448 GiB on one machine (above);
    # 250 GiB available: over by 198 GiB. With pinned_max_cached_size_mb:64: 45 GiB per process, 4 x (45 + 4) = 196
    # GiB. Processes that fit 250 GiB at 112 GiB each: 2.
    assert cli.main(["--config", CONFIG_009, "--host_memory_gib", "250"]) == exit_status.DOES_NOT_FIT == 3
    out = capsys.readouterr().out.splitlines()
    start = out.index("Host memory of activation offload (pinned), per GPU process; allocator: torch defaults (every "
                      "block rounded up to a power of two, and cached)")
    assert out[start + 1:start + 9] == [
        "  samples of 200,000 tokens: 36 layer inputs of 0.95 GiB, each rounded up to a cached block of 1.00 GiB",
        "  samples of 262,144 tokens: 36 layer inputs of 1.25 GiB, each rounded up to a cached block of 2.00 GiB",
        "  pinned per process 108.00 GiB + 4.00 GiB for Python, CUDA and data-loader workers (assumed); per machine "
        "of 4 process(es): 448.00 GiB",
        "  DOES NOT FIT this machine's 250 GiB available host memory (over by 198.00 GiB); the run would fail while "
        "pinning or be killed for memory. Fix with one of:",
        "    PYTORCH_ALLOC_CONF=pinned_max_cached_size_mb:64 (layer inputs neither rounded nor cached: 45.00 GiB "
        "pinned per process, 196.00 GiB per machine; each sample pins and frees its blocks again, slower steps, not "
        "measured)",
        "    at most 2 process(es) on this machine (NUM_PROCESSES; more machines for the same GPUs)",
        # without offload (tiled_mlp stays on): 101.12 GiB per GPU, the "tiled_mlp only" row of docs/benchmarks.md
        "    --offload_activations false (then 101.12 GiB per GPU: does not fit in 80 GiB), or a shorter "
        "--max_seq_length",
        "Schedule on 4 GPU(s):"]


def test_enough_host_memory_goes(capsys, monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "pinned_max_cached_size_mb:64")  # the fix above: 196 GiB per machine
    assert cli.main(["--config", CONFIG_009, "--host_memory_gib", "250"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert ("Host memory of activation offload (pinned), per GPU process; allocator: "
            "PYTORCH_ALLOC_CONF=pinned_max_cached_size_mb:64") in out
    assert "  fits this machine's 250 GiB available (54.00 GiB to spare)" in out  # 250 - 196


CHILD = """
import json, torch
from torch.autograd.graph import save_on_cpu
current = []
for floats in (1_310_721, 786_432):  # 5 MiB + 4 bytes (block 8 MiB), 3 MiB (block 4 MiB)
    x = torch.randn(floats, device="cuda", requires_grad=True)
    with save_on_cpu(pin_memory=True):
        y = x
        for _ in range(4):  # four "layers": each sin saves its input, which save_on_cpu packs into pinned memory
            y = y.sin()
    torch.cuda.synchronize()
    current.append(torch.cuda.host_memory_stats()["allocated_bytes.current"])
    y.sum().backward()
    torch.cuda.synchronize()
print(json.dumps(current))
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="measures torch's pinned host allocator, which needs CUDA; this machine has no CUDA device")
@pytest.mark.parametrize("alloc_conf", ["", "pinned_max_cached_size_mb:1"])
def test_measured_pinned_bytes_equal_the_plan(alloc_conf):
    """Four tensors of 5,242,884 bytes offloaded, then four of 3,145,728 (a fresh process per allocator setting).
    Defaults: blocks of 8 MiB, cached, then 4 MiB beside them: 32 MiB after the first forward, 48 MiB after the
    second. pinned_max_cached_size_mb:1: exact sizes, freed before the next sample: 20,971,536 then 12,582,912."""
    env = subprocess_env(PYTORCH_ALLOC_CONF=alloc_conf) if alloc_conf else subprocess_env()
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if not alloc_conf:
        env.pop("PYTORCH_ALLOC_CONF", None)
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    current = json.loads(proc.stdout.strip().splitlines()[-1])
    sizes = [1_310_721 * 4, 786_432 * 4]
    allocator = PinnedAllocator.from_environment({"PYTORCH_ALLOC_CONF": alloc_conf} if alloc_conf else {})
    if alloc_conf:
        assert current == [4 * 5_242_884, 4 * 3_145_728]
    else:
        assert current == [32 * MIB, 48 * MIB]
    assert max(current) == host_memory(4, sizes, 1, allocator).pinned_per_process


def test_available_host_memory_is_memavailable(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:         1000000 kB\nMemAvailable:   20971520 kB\n")
    assert available_host_memory_gib(str(meminfo)) == 20.0  # 20,971,520 kB x 1,024 / 2^30
    assert available_host_memory_gib(str(tmp_path / "absent")) is None
