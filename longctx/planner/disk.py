"""What a run writes to disk, against the free space where it goes, checked before the launch.

  OUTPUT_DIR      the checkpoints the schedule saves (save_total_limit: that many at a time, one more while the
                  next is written), less those already there (a resumed run), + the final adapter, + the W&B and
                  report files (WANDB_FILES_BYTES, assumed): refused when it does not fit, a warning under 20% spare
  datasets cache  the tokenized corpus (input ids and labels, 8 bytes each per token): a warning when the cache's
                  filesystem has less free (a corpus already cached there needs nothing new)
Free space is the filesystem's (shutil.disk_usage of the nearest directory that exists), for this user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..utils.disk import free_bytes, human_bytes

WANDB_FILES_BYTES = 64 * 2**20  # W&B's offline files, reports and plots of one run: tens of MB (assumed)
TOKEN_BYTES = 16  # input_ids and labels, int64 each, in the datasets cache's Arrow files
SPARE = 0.2  # a warning when less than this share of the need would be left


@dataclass
class DiskNeed:
    checkpoint_bytes: float
    checkpoints: int  # what the schedule saves
    kept: int  # at most on disk at once (save_total_limit + the one being written)
    existing: int  # already in OUTPUT_DIR (a resumed run)
    final_bytes: float

    @property
    def output_dir_bytes(self) -> float:
        return max(self.kept - self.existing, 0) * self.checkpoint_bytes + self.final_bytes + WANDB_FILES_BYTES


def check_output_dir_space(need: DiskNeed, output_dir: str | os.PathLike) -> tuple[str | None, str]:
    """(an error when OUTPUT_DIR's filesystem cannot hold what the run writes, else None; the summary line)."""
    free, measured = free_bytes(output_dir)
    total = need.output_dir_bytes
    written = f"{max(need.kept - need.existing, 0)} checkpoint(s) of {human_bytes(need.checkpoint_bytes)}"
    if need.kept < need.checkpoints:
        written += f" (save_total_limit keeps {need.kept - 1}, one more while the next is written)"
    if need.existing:
        written += f" beyond the {need.existing} already there"
    what = (f"{written}, the final adapter ({human_bytes(need.final_bytes)}) and W&B / report files "
            f"({human_bytes(WANDB_FILES_BYTES)}, assumed): {human_bytes(total)}")
    if free < total:
        return (f"OUTPUT_DIR {output_dir} is on a filesystem with {human_bytes(free)} free ({measured}), and the run "
                f"writes {what}; free space, point OUTPUT_DIR elsewhere, or save less (save_total_limit, save_steps, "
                f"save_only_model)."), ""
    line = f"disk: OUTPUT_DIR {human_bytes(free)} free, the run writes {what}"
    if free < total * (1 + SPARE):
        line = f"warning: {line}: less than {SPARE:.0%} to spare"
    return None, line


def check_cache_space(tokens: int, cache_dir: str | os.PathLike) -> str | None:
    """A warning when the datasets cache's filesystem has less free space than the tokenized corpus takes."""
    need = tokens * TOKEN_BYTES
    free, measured = free_bytes(cache_dir)
    if free >= need:
        return None
    return (f"warning: the datasets cache ({measured}) has {human_bytes(free)} free and the tokenized corpus takes "
            f"about {human_bytes(need)} ({tokens:,} tokens x {TOKEN_BYTES} bytes): unless it is cached there already, "
            f"tokenizing will fail; set datasets_cache_dir to a larger filesystem.")
