"""The training dataloader under sequence parallelism: DeepSpeed's UlyssesSPDataLoaderAdapter with what the Trainer
needs of a training dataloader and the adapter lacks (set_epoch, skipping batches on resume). The trainer imports
this module only when sequence_parallel_size > 1: it loads DeepSpeed."""

from __future__ import annotations

from accelerate import skip_first_batches
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter


class SequenceParallelLoader(UlyssesSPDataLoaderAdapter):
    """- set_epoch, forwarded to the inner dataloader: its shuffling order depends on the epoch, and the adapter does
      not forward it (a resume in a later epoch would otherwise replay epoch 0's order);
    - skip_first(n): a loader that starts after n of this loader's micro-batches (a resume mid-epoch). accelerate's
      skip_first_batches needs a real DataLoader (the adapter has no .dataset), so the inner dataloader skips
      n // N of its batches and the remaining n % N micro-batches are consumed here, by every rank of the SP group
      together (each micro-batch is gathered from the group)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dl, "set_epoch"):
            self.dl.set_epoch(epoch)

    def skip_first(self, num_batches: int) -> SequenceParallelLoader:
        inner, rest = divmod(num_batches, self.sp_world_size)
        skipped = SequenceParallelLoader(skip_first_batches(self.dl, inner) if inner else self.dl,
                                         sp_rank=self.sp_rank, sp_group=self.sp_group,
                                         sp_world_size=self.sp_world_size, device=self.device)
        for _ in range(rest):
            next(skipped)
        return skipped


def resumable(adapter):
    """DeepSpeed's UlyssesSPDataLoaderAdapter as a SequenceParallelLoader (same inner dataloader, group and rank); any
    other dataloader as it is."""
    if not isinstance(adapter, UlyssesSPDataLoaderAdapter) or isinstance(adapter, SequenceParallelLoader):
        return adapter
    return SequenceParallelLoader(adapter.dl, sp_rank=adapter.sp_rank, sp_group=adapter.sp_group,
                                  sp_world_size=adapter.sp_world_size, device=adapter.device)


def skip_first_batches_sp(dataloader, num_batches: int = 0):
    """accelerate's skip_first_batches, and SequenceParallelLoader's own skipping for that loader (the Trainer
    calls this in place of accelerate's while a sequence-parallel epoch runs: LongContextTrainer._run_epoch)."""
    if isinstance(dataloader, SequenceParallelLoader):
        return dataloader.skip_first(num_batches)
    return skip_first_batches(dataloader, num_batches)
