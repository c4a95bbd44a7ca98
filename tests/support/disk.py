"""A small filesystem of a known size for disk-full tests: a real tmpfs mounted for the test (Linux, as root), so
free space, ENOSPC and the writers' own errors are the kernel's, not a stand-in's."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MIB = 2**20


@contextmanager
def small_disk(where: Path, mib: int) -> Iterator[Path]:
    """`where`, a tmpfs of `mib` MiB while the block runs. Skipped (not failed) only where this process may not
    mount: that needs root (CAP_SYS_ADMIN), which a laptop's test run may lack; CI here runs as root."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"mounting a {mib} MiB tmpfs needs root (CAP_SYS_ADMIN), which this test run lacks: "
                    f"{mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(path: Path) -> int:
    """Write zeros to `path` until its filesystem has no byte left (ENOSPC); the bytes written."""
    written, chunk = 0, MIB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while chunk:
            try:
                written += os.write(fd, b"\0" * chunk)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return written
