"""Rank helpers: print and save from rank 0 only, work done by one process for the whole job, and a teardown that lets
every process exit promptly."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


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


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def on_rank_zero(fn):
    """fn() on global rank 0 only; every rank returns its result, or raises the exception it raised (so one process
    reads the data files and the run directory for the whole job, and a bad one stops every rank alike)."""
    if not is_distributed():
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, fn())]
        except Exception as err:  # noqa: BLE001 - handed to every rank, raised there as here
            box = [(False, err)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def gather_from_all(value):
    """Every rank's value, in rank order (one rank's list when not distributed)."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def teardown() -> None:
    """Barrier, then destroy the process group: without it, ranks can wait forever on each other at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def use_timeout_for_new_groups(seconds: float) -> None:
    """Process groups made from now on get `seconds` as their collective timeout. The default group gets
    ddp_timeout from the launch (TrainingArguments, or the evaluation's PartialState), but groups made later with
    dist.new_group and no timeout (DeepSpeed's ZeRO and sequence-parallel groups) get torch's default instead: 10
    minutes under NCCL, less than one rank of a 262,144-token step can wait for another. torch reads that default
    from these two module globals each time a group is made."""
    timeout = timedelta(seconds=seconds)
    c10d.default_pg_timeout = timeout
    if isinstance(c10d.default_pg_nccl_timeout, timedelta):  # None where torch was built without NCCL
        c10d.default_pg_nccl_timeout = timeout


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


def deepspeed_comm_on_cpu() -> None:
    """Sequence parallelism on a machine without GPUs: DeepSpeed's own communication layer over the gloo group
    cpu_process_group_args made (DeepSpeed builds its SP groups with it, and asserts it is initialised; on GPUs
    accelerate initialises it)."""
    import torch

    if torch.cuda.is_available() or not is_distributed():
        return
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend="gloo")
