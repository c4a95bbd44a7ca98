"""Atomic replacement of files.

Every file another process may read while it is being written (results rows, manifests, reports, plots, data
copies) is written beside its final name and renamed over it, so a reader, or a run killed mid-write, only ever
sees the old file or the new one whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block ends without an error, what was written there
    replaces `path` in one rename (fsynced first when `durable`, so the rename survives a power cut). On an
    error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomic(path: str | os.PathLike, data: str | bytes, durable: bool = True) -> Path:
    """Write text (UTF-8) or bytes to `path` through `atomic_path`. Returns the path."""
    with atomic_path(path, durable) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)
