"""ROUGE per checkpoint to Weights & Biases, against each checkpoint's own training step (the base model at 0),
and the report's ROUGE-Lsum by prompt length as a table."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..run.layout import WANDB_RUN  # written by training with the W&B run's id and project
from ..utils.atomic_write import write_atomic
from ..utils.distributed import print0
from .report import length_points
from .results import is_average

if TYPE_CHECKING:
    from .report import Findings

PREDICTION_COLUMNS = ["id", "prediction", "reference", "rougeLsum", "prompt_tokens", "prediction_tokens",
                      "reference_tokens"]


class WandbLogger:
    """ROUGE against each checkpoint's training step (custom step axis train/global_step; the base model, row
    `base`, at step 0), and one prediction table per checkpoint (its key names the checkpoint, so none is
    overwritten). After scoring, the report's ROUGE-Lsum by prompt length as the table `rouge_by_length`.

    When training left RUN_DIR/wandb_run.json, the training run is resumed (resume="allow") so ROUGE sits beside the
    loss curves. Offline, W&B cannot reach the run: it records the resume in a new offline-run-*-<same id> folder,
    and `wandb sync` of the training run's folder and then this one appends to the training run. Without the file
    (training without W&B, or still running under --follow) a new run is made in the group run_name.

    W&B cannot replace what a run has logged, so a scoring never logs a checkpoint twice under one key: each scoring
    of the training run has its own key, recorded in wandb_run.json ("evaluations"): `rouge/*` for the first, then
    `rouge@2/*`, `rouge@3/*`, ... for scorings with other settings (another eval_fingerprint) or again with --force.
    Resuming a scoring (a rerun after a crash, --follow) keeps its key: its scored checkpoints are skipped.
    """

    def __init__(self, run_dir: Path, run_name: str | None, fingerprint: str, force: bool):
        import wandb

        self.wandb = wandb
        info_path = run_dir / WANDB_RUN
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else None
        if info and info.get("id"):
            self.run = wandb.init(id=info["id"], project=info.get("project") or os.environ.get("WANDB_PROJECT"),
                                  resume="allow", dir=str(run_dir))
            self.key = evaluation_key(info_path, info, fingerprint, force)
            print0(f"W&B: logging into the training run {info['id']} (resumed; from {info_path}) under {self.key}/")
        else:
            group = run_name or run_dir.name
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT"), name=f"{group}-eval", group=group,
                                  job_type="eval", dir=str(run_dir))
            self.key = "rouge"
            print0(f"W&B: no {info_path}; logging into a new run {self.run.id} in group {group!r}")
        self.tables = "predictions" + self.key[len("rouge"):]
        self.length_table = "rouge_by_length" + self.key[len("rouge"):]
        self.run.define_metric("train/global_step")
        self.run.define_metric(f"{self.key}/*", step_metric="train/global_step")

    def log(self, row: dict, records: list[dict]) -> None:
        """One results row and its predictions (results.example_records) at the row's step. An average of checkpoints
        is no point of training: its scores go into the run's summary under averages/<name>/ (averages@2/ ... with
        the key), and its table beside the checkpoints', never onto the step axis."""
        table = self.wandb.Table(columns=PREDICTION_COLUMNS,
                                 data=[[record[c] for c in PREDICTION_COLUMNS] for record in records])
        if is_average(row):
            prefix = f"averages{self.key[len('rouge'):]}/{row['checkpoint']}"
            self.run.summary.update({f"{prefix}/{k}": row[k] for k in row if k.startswith("rouge")}
                                    | {f"{prefix}/mean_prediction_tokens": row["mean_prediction_tokens"]})
            self.run.log({f"{self.tables}/{row['checkpoint']}": table})
            return
        metrics = {f"{self.key}/{k}": row[k] for k in row if k.startswith("rouge")}
        self.run.log({"train/global_step": row["global_step"], **metrics, f"{self.key}/num_empty": row["num_empty"],
                      f"{self.key}/mean_prediction_tokens": row["mean_prediction_tokens"],
                      f"{self.tables}/{row['checkpoint']}": table})

    def log_length_table(self, findings: Findings) -> None:
        """The report's ROUGE-Lsum by prompt-length bucket (report.length_points: one line per bucket and row)."""
        points = length_points(findings)
        if points:
            columns = list(points[0])
            self.run.log({self.length_table: self.wandb.Table(columns=columns,
                                                              data=[[p[c] for c in columns] for p in points])})

    def finish(self) -> None:
        offline = self.run.settings.mode == "offline"
        run_path = Path(self.run.dir).parent
        self.run.finish()
        if offline:
            # `wandb sync` uploads the folders of one run id in order of start time: training's, then this one.
            print0(f"W&B ran offline; to upload later: wandb sync {run_path.parent}/offline-run-*-{self.run.id}")


def evaluation_key(info_path: Path, info: dict, fingerprint: str, force: bool) -> str:
    """The key prefix of this scoring in the training run, recorded in wandb_run.json: the one of an earlier scoring
    with the same settings (it is being resumed), or, for new settings or --force, the next unused one."""
    evaluations = info.setdefault("evaluations", [])
    if not force:
        for evaluation in evaluations:
            if evaluation["fingerprint"] == fingerprint:
                return evaluation["key"]
    key = "rouge" if not evaluations else f"rouge@{len(evaluations) + 1}"
    evaluations.append({"key": key, "fingerprint": fingerprint, "force": force})
    write_atomic(info_path, json.dumps(info))
    return key
