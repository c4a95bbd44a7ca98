"""longctx.utils.disk: a full disk is told from other write failures in each shape the writers report it."""

from __future__ import annotations

import errno

import pytest
import torch
from safetensors.torch import save_file

from longctx.utils.disk import free_bytes, human_bytes, is_disk_full
from support.disk import fill, small_disk


def test_enospc_and_a_quota_are_a_full_disk_wherever_they_are_in_the_chain(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as quota:
            raise RuntimeError("saving failed") from quota
    except RuntimeError as chained:
        assert is_disk_full(chained, tmp_path)
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied"), tmp_path)


def test_dev_full_gives_a_real_enospc(tmp_path):
    with pytest.raises(OSError) as err:  # /dev/full answers every write with ENOSPC (Linux)
        with open("/dev/full", "w") as f:
            f.write("x")
    assert err.value.errno == errno.ENOSPC and is_disk_full(err.value, tmp_path)


def test_a_torch_write_failure_is_a_full_disk_only_when_the_disk_is_nearly_full(tmp_path):
    with pytest.raises(RuntimeError) as failed:  # torch's zip writer: no errno, "unexpected pos"
        torch.save(torch.zeros(1000), "/dev/full")
    assert "unexpected pos" in str(failed.value)
    # tmp_path's filesystem has space (the test asserts it): the same words there are some other failure
    assert free_bytes(tmp_path)[0] > 2**30
    assert not is_disk_full(failed.value, tmp_path)
    with small_disk(tmp_path / "small", 4) as small:
        fill(small / "filler")
        assert free_bytes(small)[0] == 0
        with pytest.raises(RuntimeError) as full:
            torch.save(torch.zeros(1000), small / "x.pt")
        with pytest.raises(Exception) as safetensors_full:  # safetensors: SafetensorError, no errno either
            save_file({"a": torch.zeros(1000)}, str(small / "a.safetensors"))
        assert is_disk_full(full.value, small) and is_disk_full(safetensors_full.value, small)


def test_sizes_in_words():
    # below 0.1 GiB (107,374,182 bytes) in MiB with one decimal, else GiB with two
    assert [human_bytes(b) for b in (0, 3 * 2**20 + 2**19, 2**30, 5 * 2**29)] == [
        "0.0 MiB", "3.5 MiB", "1.00 GiB", "2.50 GiB"]
