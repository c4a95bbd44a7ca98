"""Host memory of activation offload: what torch's pinned allocator really holds, against what the machine has.

offload_activations keeps every checkpointed layer input of a sample in pinned host memory (save_on_cpu, one
tensor per layer). torch's pinned allocator (ATen/core/CachingHostAllocator.h) rounds each block up to a power of
two and keeps freed blocks cached for reuse, in one free list per power of two: a 1.25 GiB layer input takes a
2 GiB block, and samples whose layer inputs fall in another power-of-two class get a set of blocks of their own,
which stays cached beside the first. Two settings of PYTORCH_ALLOC_CONF (PYTORCH_CUDA_ALLOC_CONF when it is unset)
change this: blocks above pinned_max_round_threshold_mb are not rounded, and blocks above pinned_max_cached_size_mb
are neither rounded nor cached (freed after use, pinned again for the next sample). The training processes inherit
the launcher's environment, so the plan reads the same variables they will.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .estimate import GIB, human_bytes

MIB = 2**20
# Per training process besides the pinned blocks: Python, torch and the CUDA host state, data-loader workers
# (an assumption, not measured).
PROCESS_BYTES = 4 * GIB
# The fix the plan suggests: layer inputs (tens of MiB and up at long context) neither rounded nor cached.
UNCACHED_SETTING = "pinned_max_cached_size_mb:64"


def pinned_block_bytes(num_bytes: int) -> int:
    """The block torch's pinned allocator takes for one tensor under its defaults: the size rounded up to a power of
    two (c10::llvm::PowerOf2Ceil), so that freed blocks can be reused from one free list per power of two."""
    return 1 << max(0, int(num_bytes) - 1).bit_length()


def allocator_settings(env: Mapping[str, str] = os.environ) -> tuple[dict[str, str], str]:
    """The key:value pairs of PYTORCH_ALLOC_CONF (else PYTORCH_CUDA_ALLOC_CONF) and the variable's name; values
    in brackets (roundup_power2_divisions:[...]) are kept whole."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        if env.get(name):
            pairs, depth, item = {}, 0, ""
            for char in env[name] + ",":
                depth += (char == "[") - (char == "]")
                if char == "," and depth == 0:
                    key, _, value = item.partition(":")
                    pairs[key.strip()] = value.strip()
                    item = ""
                else:
                    item += char
            return pairs, name
    return {}, ""


@dataclass(frozen=True)
class PinnedAllocator:
    """torch's pinned host allocator as configured: which blocks it rounds up and which it keeps cached."""

    round_threshold_bytes: float = math.inf
    cached_size_bytes: float = math.inf
    setting: str = ""  # e.g. "PYTORCH_ALLOC_CONF=pinned_max_cached_size_mb:64"; "" for torch's defaults

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> PinnedAllocator:
        pairs, name = allocator_settings(env)
        limits = {key: float(pairs[key]) * MIB for key in ("pinned_max_round_threshold_mb", "pinned_max_cached_size_mb")
                  if key in pairs}
        if not limits:
            return cls()
        shown = ",".join(f"{key}:{pairs[key]}" for key in sorted(pairs) if key.startswith("pinned_max_"))
        return cls(limits.get("pinned_max_round_threshold_mb", math.inf),
                   limits.get("pinned_max_cached_size_mb", math.inf), f"{name}={shown}")

    def block_bytes(self, size: int) -> int:
        """The block one tensor of `size` bytes takes (CachingHostAllocator::allocate's roundSize)."""
        if size <= self.round_threshold_bytes and size <= self.cached_size_bytes:
            return pinned_block_bytes(size)
        return int(size)

    def caches(self, block: int) -> bool:
        return block <= self.cached_size_bytes


@dataclass
class HostMemory:
    """Pinned host memory of one training process and of one machine, and whether the machine has it."""

    layers: int
    layer_input_sizes: list[int]   # bytes of one layer input, per distinct sample length planned
    allocator: PinnedAllocator
    processes_per_machine: int

    @property
    def blocks(self) -> dict[int, int]:
        """layer-input bytes -> the block each takes."""
        return {size: self.allocator.block_bytes(size) for size in self.layer_input_sizes}

    @property
    def pinned_per_process(self) -> float:
        """Cached blocks stay for the rest of the run, one set of `layers` per distinct block size; uncached ones
        live only through their sample's backward, so only the largest set counts."""
        sizes = set(self.blocks.values())
        cached = sum(b for b in sizes if self.allocator.caches(b))
        transient = max((b for b in sizes if not self.allocator.caches(b)), default=0)
        return self.layers * (cached + transient)

    @property
    def per_machine(self) -> float:
        return self.processes_per_machine * (self.pinned_per_process + PROCESS_BYTES)

    def with_allocator(self, allocator: PinnedAllocator) -> HostMemory:
        return HostMemory(self.layers, self.layer_input_sizes, allocator, self.processes_per_machine)


def host_memory(layers: int, layer_input_sizes: Iterable[int], processes_per_machine: int,
                allocator: PinnedAllocator | None = None) -> HostMemory:
    """The allocator as the environment configures it, unless one is given."""
    return HostMemory(layers, sorted(set(layer_input_sizes)), allocator or PinnedAllocator.from_environment(),
                      processes_per_machine)


def available_host_memory_gib(meminfo: str = "/proc/meminfo") -> float | None:
    """MemAvailable of this machine in GiB (what the launcher passes as --host_memory_gib), None where unknown."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def format_host(host: HostMemory, tokens_of: dict[int, int], available_gib: float | None,
                without_offload: str) -> tuple[list[str], bool]:
    """The host-memory lines of the plan and whether the machine has enough (True when not compared).
    `tokens_of`: layer-input bytes -> the sample tokens it stands for; `without_offload`: what the GPU plan says
    with offload_activations off (the last fix offered)."""
    lines = [f"Host memory of activation offload (pinned), per GPU process; allocator: "
             f"{host.allocator.setting or 'torch defaults (every block rounded up to a power of two, and cached)'}"]
    groups: dict[tuple[int | None, bool], list[int]] = {}
    for size, block in host.blocks.items():  # one line per rounded block size, one for the blocks of exact size
        groups.setdefault((block if block != size else None, host.allocator.caches(block)), []).append(size)
    for (block, cached), sizes in groups.items():
        low, high = tokens_of[min(sizes)], tokens_of[max(sizes)]
        kind = "a cached" if cached else "an uncached"
        how = (f"rounded up to {kind} block of {human_bytes(block)}" if block is not None
               else f"in {kind} block of its own size")
        lines.append(f"  samples of {low:,}{f' to {high:,}' if high != low else ''} tokens: {host.layers} layer "
                     f"inputs of {'up to ' if len(sizes) > 1 else ''}{human_bytes(max(sizes))}, each {how}")
    per_process = host.pinned_per_process
    lines.append(f"  pinned per process {human_bytes(per_process)} + {human_bytes(PROCESS_BYTES)} for Python, CUDA and "
                 f"data-loader workers (assumed); per machine of {host.processes_per_machine} process(es): "
                 f"{human_bytes(host.per_machine)}")
    fixed = host.with_allocator(PinnedAllocator(cached_size_bytes=64 * MIB, setting=UNCACHED_SETTING))
    fix = (f"PYTORCH_ALLOC_CONF={UNCACHED_SETTING} (layer inputs neither rounded nor cached: "
           f"{human_bytes(fixed.pinned_per_process)} pinned per process, {human_bytes(fixed.per_machine)} per "
           f"machine; each sample pins and frees its blocks again, slower steps, not measured)")
    improves = fixed.per_machine < host.per_machine
    if available_gib is None:
        lines.append("  not compared with a machine's memory: --host_memory_gib gives it (MemAvailable of the "
                     "training machine)")
        if improves:
            lines.append(f"  less with {fix}")
        return lines, True
    if host.per_machine <= available_gib * GIB:
        lines.append(f"  fits this machine's {available_gib:g} GiB available "
                     f"({human_bytes(available_gib * GIB - host.per_machine)} to spare)")
        return lines, True
    per_process_total = per_process + PROCESS_BYTES
    lines += [f"  DOES NOT FIT this machine's {available_gib:g} GiB available host memory (over by "
              f"{human_bytes(host.per_machine - available_gib * GIB)}); the run would fail while pinning or be "
              f"killed for memory. Fix with one of:"]
    if improves:
        lines.append(f"    {fix}")
    fitting = int(available_gib * GIB // per_process_total)
    if fitting:
        lines.append(f"    at most {fitting} process(es) on this machine (NUM_PROCESSES; more machines for the same "
                     f"GPUs)")
    lines.append(f"    --offload_activations false ({without_offload}), or a shorter --max_seq_length")
    return lines, False
