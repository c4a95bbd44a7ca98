"""Rank helpers: print and save from rank 0 only, and a teardown that lets every process exit promptly."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def print0(*args, file=None, **kwargs) -> None:
    """The one way this project prints: rank 0 only, flushed, so launcher logs stay readable."""
    if is_main_process():
        print(*args, file=file or sys.stdout, flush=True, **kwargs)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    """Barrier, then destroy the process group: without it, ranks can wait forever on each other at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def deepspeed_on_cpu_args(argv: list[str]) -> list[str]:
    """Extra arguments that let DeepSpeed run data-parallel on a machine without GPUs (tests, laptops).

    accelerate attaches DeepSpeed to a process group only on accelerators; on a CPU-only machine every DeepSpeed
    process believes it is alone (world size 1), so data is not sharded and "auto" batch sizes are wrong. Here the
    gloo process group is created first, marked as DeepSpeed's, and TrainingArguments is told to use it
    (accelerator_config.use_configured_state). On GPUs this returns [] and nothing changes.
    """
    import torch

    wants_deepspeed = "--deepspeed" in argv or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if torch.cuda.is_available() or not wants_deepspeed or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return []
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True)  # gloo process group over the launcher's RANK / WORLD_SIZE / MASTER_ADDR
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    return ["--accelerator_config", '{"use_configured_state": true}']
