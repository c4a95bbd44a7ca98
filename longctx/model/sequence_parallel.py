"""Ulysses sequence parallelism (the `sequence_parallel_size` setting): each sample's sequence is split over N GPUs.

    sequence_parallel_size: 4    # config.yaml (MemoryArguments); needs DeepSpeed ZeRO 1-3, see longctx.config

DeepSpeed's ALST, switched on through accelerate's ParallelismConfig and the HF Trainer, nothing home-made:
accelerate registers DeepSpeed's Ulysses attention (an all-to-all turns the sequence-sharded q, k, v into
head-sharded full-length ones and back) and the Trainer wraps the training dataloader in DeepSpeed's
UlyssesSPDataLoaderAdapter. The adapter gathers one batch from every rank of an SP group and hands them out one at a
time, each cut along the sequence: every rank of the group works on the same sample, on its 1/N of the tokens. The
batch loses `labels` and gains the pre-shifted `shift_labels` (cut the same way). So:
  - the number of samples in an optimizer step is per_device_train_batch_size x gradient_accumulation_steps x
    world size / N (one data-parallel group per N GPUs);
  - the loss (longctx.model.loss) reads `shift_labels`; its label-token count is summed over every rank (this module's
    `label_tokens`), and the Trainer's multiplier for the gradient average is the data-parallel size world / N;
  - resuming mid-epoch skips batches of the inner dataloader (longctx.training.sp_dataloader), which the adapter
    cannot.
Evaluation runs with SP off (DeepSpeed's disable_in_eval): each rank evaluates whole sequences.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..labels import IGNORE_INDEX


def parallelism_config(sp_size: int, world_size: int, attn_implementation: str):
    """accelerate's ParallelismConfig for Ulysses SP over `world_size` processes: sp_size GPUs share a sample and
    world_size / sp_size such groups are data-parallel replicas (dp_replicate_size: accelerate's own guide says
    dp_replicate x dp_shard x sp = processes, and it sizes DeepSpeed's train_batch_size from the replicas). The
    attention DeepSpeed wraps must be the one the model loaded with (DeepSpeed refuses a mismatch)."""
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    return ParallelismConfig(
        sp_backend="deepspeed", sp_size=sp_size, dp_replicate_size=world_size // sp_size, dp_shard_size=1,
        sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True,
                                                   sp_attn_implementation=attn_implementation))


def gradient_average_size(world_size: int, sp_size: int, zero_stage: int) -> int:
    """What DeepSpeed divides the gradients summed over all ranks by under SP, so what the loss (a share of the
    step's token count) is multiplied by to give the single-process gradient. ZeRO 1 and 2 divide by the
    data-parallel size world / sp_size (deepspeed/runtime/zero/stage_1_and_2.py: dp_world_size / sequence_parallel
    _size); ZeRO 3 with reduce_scatter (validation requires it) divides by the world size (reduce_scatter_coalesced
    averages over every rank). Measured on CPU, 2 ranks, SP 2: grad_norm equal to one process's with these, half
    of it under ZeRO 3 with world / sp_size."""
    return world_size if zero_stage == 3 else world_size // sp_size


def padded_length(max_seq_length: int, sp_size: int) -> int:
    """max_seq_length rounded up to a multiple of sp_size: the one length every CPU training batch is padded to."""
    return -(-max_seq_length // sp_size) * sp_size


def collator_padding(sp_size: int, max_seq_length: int, pad_to_multiple_of: int | None, cuda: bool) -> dict:
    """The padding arguments of the training collator (longctx.collate.PadCollator). SP off: the setting as it is.
    On GPUs: a multiple of sp_size (pad_to_multiple_of itself when set: validation made it a multiple), NCCL takes
    unequal lengths on the ranks. On CPU: every batch max_seq_length long, rounded up to a multiple of sp_size,
    because gloo's all_gather (the adapter gathers the SP group's batches) needs equal shapes on every rank."""
    if sp_size == 1:
        return {"pad_to_multiple_of": pad_to_multiple_of}
    if cuda:
        return {"pad_to_multiple_of": pad_to_multiple_of or sp_size}
    return {"pad_to_length": padded_length(max_seq_length, sp_size)}


def label_tokens(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Label tokens of these SP micro-batches on this rank (its share of each sample), from `shift_labels`: already
    shifted, so every position that is not IGNORE_INDEX is a prediction target."""
    return sum((batch["shift_labels"] != IGNORE_INDEX).sum() for batch in batches)


def sp_group():
    """This rank's sequence-parallel process group (DeepSpeed's, made by accelerate when preparing the model)."""
    from deepspeed.utils import groups

    return groups._get_sequence_parallel_group()


def logged_as(for_gradient: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
    """A loss whose value is `shown` and whose gradient is `for_gradient`'s (the difference is a constant)."""
    return for_gradient + (shown - for_gradient.detach())


def sp_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over this rank's SP group (a detached copy): the parts of one sample added up."""
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=sp_group())
    return total
