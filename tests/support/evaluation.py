"""Helpers of the evaluation tests (tests/eval/): copy and read runs, score in-process (running and following
launchers: support/launching.py). The session's real training run itself is a fixture in conftest.py (`trained_run`,
`scored_run`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .paths import REPO_ROOT

# 12 records (2 too long -> dropped) -> 5 optimizer steps; no warmup so that the later checkpoints already write text.
QUICK_TRAINING = ["--max_train_samples", "12", "--max_eval_samples", "4", "--num_train_epochs", "1",
                  "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--warmup_steps", "0"]
NAMES = ["checkpoint-2", "checkpoint-4", "checkpoint-5", "final_adapter"]
SCORED = ["base", *NAMES]  # the rows of a scoring: the base model (step 0) first
# Batches of 2 of the 4 validation prompts: with 2 processes each generates one batch.
SCORE_FLAGS = ["--report_to", "none", "--generation_batch_size", "2"]
EVAL_OUTPUTS = ("eval_results.jsonl", "eval_summary.md", "rouge_by_step.png", "rouge_by_step.csv", "loss_curve.png",
                "loss_curve.csv", "best_checkpoint", "eval_predictions.jsonl", "eval_base_predictions.jsonl",
                "rouge_by_length.png", "rouge_by_length.csv")


def copy_run(src: Path, dst: Path, without: tuple[str, ...] = ()) -> Path:
    """A fresh copy of a run without evaluation outputs (and without the named entries)."""
    shutil.copytree(src, dst, symlinks=True, ignore=lambda _d, names: [n for n in names
                                                                      if n in EVAL_OUTPUTS or n in without])
    return dst


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval_results.jsonl").read_text().splitlines()]


def predictions_of(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "eval_predictions.jsonl").read_text().splitlines()]


def scored_predictions(run_dir: Path, name: str) -> list[dict]:
    """The predictions file of a results row: the base model's in the run directory, else the checkpoint's."""
    if name == "base":
        return [json.loads(line) for line in (run_dir / "eval_base_predictions.jsonl").read_text().splitlines()]
    return predictions_of(run_dir / name)


def line_count(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.is_file() else 0


def inprocess(run_dir: Path, *flags: str) -> int:
    """The evaluation's main in this process (repository root as working directory); returns the exit status."""
    from longctx.eval import cli

    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        cli.main(["--config", str(run_dir / "run_config.yaml"), "--output_dir", str(run_dir), "--all_checkpoints",
                  "--report_to", "none", *flags])
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        os.chdir(cwd)
