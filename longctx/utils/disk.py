"""Free space, sizes in words, and telling a full disk from other write failures.

A full filesystem shows up in more than one shape: an OSError with errno ENOSPC (or EDQUOT, a quota) from Python's own
writes and safetensors, but from torch.save (its C++ zip writer) a RuntimeError that only says "file write failed" or
"unexpected pos". Those are taken for a full disk when the filesystem has less than NEARLY_FULL_BYTES free right after
the failure; any other error is left as it is.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

GIB = 2**30
NEARLY_FULL_BYTES = 64 * 2**20  # below this much free, a failed write is taken for a full disk
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
WRITE_FAILED = ("file write failed", "unexpected pos", "No space left on device", "Disk quota exceeded")


def human_bytes(num_bytes: float) -> str:
    if abs(num_bytes) < 0.1 * GIB:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / GIB:.2f} GiB"


def free_bytes(path: str | os.PathLike) -> tuple[float, Path]:
    """Free space (for this user) of the filesystem `path` is, or will be, on, and the directory measured: the
    nearest one that exists."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return float(shutil.disk_usage(where).free), where


def directory_bytes(path: str | os.PathLike) -> int:
    """What the files under `path` take (their sizes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def is_disk_full(err: BaseException, path: str | os.PathLike) -> bool:
    """Whether `err` (or an error it was raised from) is a write that failed because `path`'s filesystem is full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return True
        if any(words in str(err) for words in WRITE_FAILED):
            return free_bytes(path)[0] < NEARLY_FULL_BYTES
        err = err.__cause__ or err.__context__
    return False
