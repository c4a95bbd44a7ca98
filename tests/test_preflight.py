"""The launcher's preflight (longctx.preflight, in the launcher's own process): every mistake a user makes in the
first hour is one line `error: ...` naming the setting, file:line:field or OUTPUT_DIR and the fix, exit 2, before
accelerate or any model starts; a run directory holds one run. The whole stderr is asserted.

The used OUTPUT_DIR is a copy of the session's reference run (launching.REFERENCE: 16 records, one epoch, 7 steps).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from longctx.run.layout import RUN_OUTPUTS
from support.env import write_jsonl
from support.launching import run
from support.paths import CONFIG_000, REPO_ROOT
from support.paths import TRAIN_000 as TRAIN

pytestmark = pytest.mark.e2e
TINY_TRAIN = REPO_ROOT / ".cache" / "tiny_smoke" / "data" / "train.jsonl"
TINY_VALIDATION = REPO_ROOT / ".cache" / "tiny_smoke" / "data" / "validation.jsonl"


@pytest.fixture()
def used(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out, symlinks=True)
    return out


def sha8(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def records(count: int, start: int = 2) -> list[dict]:
    return [json.loads(line) for line in TINY_TRAIN.read_text().splitlines()[start:start + count]]


def test_own_data_into_a_used_output_dir_is_refused_naming_what_differs(used, tmp_path):
    """The issue's example: after the quick start, own data and --max_steps 10 into the same OUTPUT_DIR. Every
    difference from the run's first launch is named (settings: the reference's REFERENCE flags that are not given
    now; data: content hashes), and the three ways on."""
    mine, mine_val = write_jsonl(tmp_path / "my.jsonl", records(10)), write_jsonl(tmp_path / "my_val.jsonl", records(4))
    proc = run(["bash", TRAIN, "--train_file", mine, "--validation_file", mine_val, "--max_steps", "10"],
               OUTPUT_DIR=str(used))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: OUTPUT_DIR {used} holds another run: full_determinism: True -> False; max_steps: -1 -> 10; "
        f"max_train_samples: 16 -> None; num_train_epochs: 1.0 -> 6; train_file content (sha256 {sha8(TINY_TRAIN)} -> "
        f"{sha8(mine)}); validation_file content (sha256 {sha8(TINY_VALIDATION)} -> {sha8(mine_val)}). To go on, "
        f"choose another OUTPUT_DIR, start afresh with OVERWRITE=1 (deletes that run), or relaunch with that run's "
        f"settings and data ({used / 'run_config.yaml'}).\n")
    assert "+ " not in proc.stdout and "W&B ran offline" not in proc.stdout


def test_relaunching_a_finished_run_says_so_and_trains_nothing(used):
    proc = run(["bash", TRAIN, "--max_train_samples", "16", "--max_eval_samples", "4", "--num_train_epochs", "1",
                "--full_determinism", "true"], OUTPUT_DIR=str(used))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: OUTPUT_DIR {used} holds a finished run (final_adapter at step 7): nothing to "
                           f"train. To train again, choose another OUTPUT_DIR or start afresh with OVERWRITE=1 "
                           f"(deletes that run); to score it, run eval_all_checkpoints.sh.\n")


def test_a_run_without_a_recorded_identity_is_still_not_trained_past_max_steps(used):
    """A run directory from before runs recorded their identity, crashed before its final adapter."""
    info = json.loads((used / "run_info.json").read_text())
    del info["identity"]
    (used / "run_info.json").write_text(json.dumps(info))
    shutil.rmtree(used / "final_adapter")
    proc = run(["bash", TRAIN, "--max_steps", "3"], OUTPUT_DIR=str(used))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: setting 'max_steps' = 3: OUTPUT_DIR {used} is already at step 7 (checkpoint-7); "
                           f"nothing to train. Raise max_steps, or choose another OUTPUT_DIR, start afresh with "
                           f"OVERWRITE=1 (deletes that run), or relaunch with that run's settings and data "
                           f"({used / 'run_config.yaml'}).\n")


def test_resume_never_refuses_a_used_output_dir(used):
    proc = run(["bash", TRAIN], OUTPUT_DIR=str(used), RESUME="never")
    assert proc.returncode == 2
    assert proc.stderr == (f"error: setting 'resume' = 'never' but OUTPUT_DIR {used} already holds checkpoint-3; set "
                           f"RESUME=auto to continue that run, OVERWRITE=1 to delete it and start afresh, or choose "
                           f"another OUTPUT_DIR.\n")


@pytest.mark.parametrize("resume", ["auto", "never"])
def test_overwrite_starts_afresh_under_any_resume(used, resume):
    """Every file a run and its evaluation write goes; a file of the user's stays. (The launcher runs this step of
    its preflight last, after every check passed.)"""
    for name in ("eval_results.jsonl", "eval_summary.md", "rouge_by_step.png", "rouge_by_step.csv", "loss_curve.png",
                 "loss_curve.csv", "bad_records.jsonl"):
        (used / name).write_text("x")
    (used / "data_usable").mkdir()
    (used / "best_checkpoint").symlink_to("checkpoint-6")
    (used / "notes.txt").write_text("mine")
    before = {p.name for p in used.iterdir()}
    assert {"checkpoint-3", "final_adapter", "wandb", "wandb_run.json", "run_info.json"} <= before
    # OVERWRITE=1 reaches the preflight as the setting (one route: the launcher adds --overwrite true)
    proc = subprocess.run([sys.executable, "-m", "longctx.preflight", "--", "--config", str(CONFIG_000),
                           "--output_dir", str(used), "--resume", resume, "--overwrite", "true"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in used.iterdir()) == ["notes.txt"]
    removed = before - {"notes.txt"}
    assert removed <= set(RUN_OUTPUTS) | {"checkpoint-3", "checkpoint-6", "checkpoint-7"}
    assert f"overwrite: removed {len(removed)} entries of the earlier run from {used}" in proc.stdout


def test_a_record_with_an_empty_summary_is_named_with_the_skip_option(tmp_path, tiny_dir):
    rows = records(10)
    rows[3]["summary"] = ""
    rows[7]["document"] = 12
    data = write_jsonl(tmp_path / "my.jsonl", rows)
    proc = run(["bash", TRAIN, "--train_file", data], OUTPUT_DIR=str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {data}: 2 unusable records of 10; fix them, or set on_bad_record: skip to train "
                           f"without them (they are then listed in OUTPUT_DIR/bad_records.jsonl)\n"
                           f"  {data}:4: field 'summary' is empty; remove the record or fill the field.\n"
                           f"  {data}:8: field 'document' must be a string, got int.\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,message", [
    (["--learning_rate", "abc"], "error: command line: argument --learning_rate: invalid float value: 'abc'; see "
                                 "--help for every setting.\n"),
    (["--lerning_rate", "5e-5"], "error: command line: unknown setting '--lerning_rate'. Did you mean "
                                 "'--learning_rate'?\n"),
    (["--lora", "8"], "error: command line: unknown setting '--lora'. Did you mean '--lora_r'?\n"),
    (["--lora_r", "abc"], "error: command line: argument --lora_r: invalid int value: 'abc'; see --help for every "
                          "setting.\n"),
], ids=["bad-value", "misspelled", "shortened", "bad-int"])
def test_a_bad_flag_through_the_launcher_is_one_line(tmp_path, tiny_dir, flags, message):
    proc = run(["bash", TRAIN, *flags], OUTPUT_DIR=str(tmp_path / "run"))
    assert (proc.returncode, proc.stderr) == (2, message)
    assert not (tmp_path / "run").exists()
