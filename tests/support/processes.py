"""Real multi-process tests without a launcher: `run_ranks(fn)` forks N processes that form one gloo process group
(as accelerate and torchrun make on a CPU) and returns what fn(rank, world_size) returned on each. Forked, not spawned:
test modules are imported by path (pytest's importlib mode), so a child could not import them by name."""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[[int, int], Any], tmp_path: Path, world_size: int = 2, init_group: bool = True,
              timeout: float = 120) -> list[Any]:
    """fn(rank, world_size) in `world_size` forked processes, each with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    set as a launcher sets them; with init_group, already joined in one gloo process group. Returns each rank's
    result in rank order; a rank that raised fails the calling test with that rank's traceback."""
    import torch.distributed as dist

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    port = free_port()

    def child(rank: int) -> None:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        try:
            if init_group:
                dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank,
                                        world_size=world_size)
            results.put((rank, None, fn(rank, world_size)))
        except BaseException:  # noqa: BLE001 - the parent reports it
            results.put((rank, traceback.format_exc(), None))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    processes = [ctx.Process(target=child, args=(rank,)) for rank in range(world_size)]
    for process in processes:
        process.start()
    collected = {}
    for _ in processes:
        rank, error, value = results.get(timeout=timeout)
        collected[rank] = (error, value)
    for process in processes:
        process.join(timeout=timeout)
    failures = [f"rank {rank}:\n{error}" for rank, (error, _) in sorted(collected.items()) if error]
    assert not failures, "\n".join(failures)
    return [collected[rank][1] for rank in range(world_size)]
