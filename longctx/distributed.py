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


def teardown() -> None:
    """Barrier, then destroy the process group: without it, ranks can wait forever on each other at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cpu_process_group_args(argv: list[str]) -> list[str]:
    """Extra arguments that let several training processes on a machine without GPUs (tests, laptops) form one
    data-parallel job, under plain DDP and under DeepSpeed.

    transformers' TrainingArguments builds its process group only for accelerators (or use_cpu, which accelerate
    launch turns into a single process): on a CPU-only machine every process of a multi-process launch believes it
    is alone (world size 1), so data is not sharded, every rank saves as rank 0, and DeepSpeed's "auto" batch sizes
    are wrong. Here the gloo process group is created first (marked as DeepSpeed's when DeepSpeed is on), and
    TrainingArguments is told to use it (accelerator_config.use_configured_state). On GPUs, or with one process,
    this returns [] and nothing changes.
    """
    import torch

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return []
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True)  # gloo process group over the launcher's RANK / WORLD_SIZE / MASTER_ADDR
    if "--deepspeed" in argv or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    return ["--accelerator_config", '{"use_configured_state": true}']
