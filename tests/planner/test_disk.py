"""longctx.planner.disk: OUTPUT_DIR's free space against what the run writes, in one line each way."""

from __future__ import annotations

import shutil

from longctx.planner.disk import DiskNeed, check_cache_space, check_output_dir_space

MIB = 2**20


def with_free(monkeypatch, free: int) -> None:
    """The free space shutil.disk_usage reports (a unit test of the arithmetic; the launcher's refusal on a real
    small filesystem is tests/test_operations.py)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 0, free))


NEED = DiskNeed(checkpoint_bytes=10 * MIB, checkpoints=5, kept=3, existing=1, final_bytes=2 * MIB)
# writes: (kept 3 - existing 1) x 10 MiB + final 2 MiB + W&B 64 MiB = 86 MiB


def test_a_run_that_does_not_fit_is_refused_naming_the_sizes_and_the_fixes(monkeypatch, tmp_path):
    with_free(monkeypatch, 50 * MIB)
    error, line = check_output_dir_space(NEED, tmp_path / "run")
    assert line == ""
    assert error == (
        f"OUTPUT_DIR {tmp_path / 'run'} is on a filesystem with 50.0 MiB free ({tmp_path}), and the run writes "
        f"2 checkpoint(s) of 10.0 MiB (save_total_limit keeps 2, one more while the next is written) beyond the 1 "
        f"already there, the final adapter (2.0 MiB) and W&B / report files (64.0 MiB, assumed): 86.0 MiB; free "
        f"space, point OUTPUT_DIR elsewhere, or save less (save_total_limit, save_steps, save_only_model).")


def test_a_run_that_fits_gets_a_line_and_a_warning_under_20_percent_spare(monkeypatch, tmp_path):
    what = ("2 checkpoint(s) of 10.0 MiB (save_total_limit keeps 2, one more while the next is written) beyond the "
            "1 already there, the final adapter (2.0 MiB) and W&B / report files (64.0 MiB, assumed): 86.0 MiB")
    with_free(monkeypatch, 200 * MIB)  # 200 >= 86 x 1.2 = 103.2; 200 MiB = 0.195 GiB, over 0.1 GiB: in GiB
    assert check_output_dir_space(NEED, tmp_path) == (None, f"disk: OUTPUT_DIR 0.20 GiB free, the run writes {what}")
    with_free(monkeypatch, 90 * MIB)  # 86 <= 90 < 103.2
    assert check_output_dir_space(NEED, tmp_path) == (
        None, f"warning: disk: OUTPUT_DIR 90.0 MiB free, the run writes {what}: less than 20% to spare")


def test_a_small_datasets_cache_is_a_warning(monkeypatch, tmp_path):
    with_free(monkeypatch, 1 * MIB)  # 1,000,000 tokens x 16 bytes = 15.3 MiB > 1 MiB
    assert check_cache_space(1_000_000, tmp_path) == (
        f"warning: the datasets cache ({tmp_path}) has 1.0 MiB free and the tokenized corpus takes about 15.3 MiB "
        f"(1,000,000 tokens x 16 bytes): unless it is cached there already, tokenizing will fail; set "
        f"datasets_cache_dir to a larger filesystem.")
    with_free(monkeypatch, 16 * MIB)
    assert check_cache_space(1_000_000, tmp_path) is None
