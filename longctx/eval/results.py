"""The results store: RUN_DIR/eval_results.jsonl (one row per scored checkpoint, `base`, the model without adapter,
and each average of checkpoints) and the predictions files (CHECKPOINT/eval_predictions.jsonl,
RUN_DIR/eval_base_predictions.jsonl, RUN_DIR/averages/<name>/eval_predictions.jsonl): one
line per validation example with its token counts and ROUGE scores, what every later analysis reads.

A row is reused instead of scored again when its eval_fingerprint (longctx.eval.job.scoring_settings: a hash of
everything that changes the predictions or their scores) equals the current one; an average's row also only while its
members' adapters are those it was scored from (average_sha256, their manifests' sha256). Rows are
written by rewriting the whole file beside and renaming it over the old one, under an exclusive lock of the run
directory, so a run killed at any moment leaves whole rows only, and two evaluations of one run never lose each
other's rows. `longctx.eval.report`'s command line reads rows through `read_results` too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..run.checkpoints import Checkpoint
from ..run.layout import AVERAGES_DIR, BASE_MODEL, BASE_PREDICTIONS_FILE, PREDICTIONS_FILE, RESULTS_FILE
from ..utils.atomic_write import write_atomic
from ..utils.jsonl import numbered_values
from .metrics import ROUGE_TYPES

if TYPE_CHECKING:
    from .generation import Prediction, Prompt

# The keys of a predictions line: the example, then what the analyses read (token counts, ROUGE F-measures).
EXAMPLE_FIELDS = ("prompt_tokens", "reference_tokens", "prediction_tokens", *ROUGE_TYPES)


@dataclass(frozen=True)
class BaseModel:
    """The base model without adapter, scored as step 0 of the run in `run_dir`: its row is `base`, its predictions
    RUN_DIR/eval_base_predictions.jsonl. Scored before any adapter is loaded (the swapper then holds the plain base)."""

    run_dir: Path
    name: ClassVar[str] = BASE_MODEL
    global_step: ClassVar[int] = 0


@dataclass(frozen=True)
class Average(Checkpoint):
    """The exact average of several checkpoints' LoRA updates (longctx.model.averaging), scored as one more row named
    after its members' steps (average-400+450+474) at the step of its last member. Its adapter directory,
    RUN_DIR/averages/<name>/, is written when it is to be scored; its predictions go there."""

    members: tuple = ()  # longctx.model.averaging.Member, in step order

    @property
    def member_sha256(self) -> list[str]:
        return [m.adapter_sha256 for m in self.members]


Scored = Checkpoint | BaseModel  # what one results row scores (an Average is a Checkpoint)


def is_average(row: dict) -> bool:
    """A row of an average of checkpoints: never the best, not on the step axis (longctx.eval.report)."""
    return "average_of" in row


def predictions_path(target: Scored) -> Path:
    if isinstance(target, BaseModel):
        return target.run_dir / BASE_PREDICTIONS_FILE
    return target.path / PREDICTIONS_FILE


def row_predictions_path(run_dir: str | Path, row: dict) -> Path:
    """The predictions file of a results row: the checkpoint's in the run, or where it was scored from
    (--checkpoint elsewhere)."""
    run_dir = Path(run_dir)
    if row["checkpoint"] == BASE_MODEL:
        return run_dir / BASE_PREDICTIONS_FILE
    path = run_dir / (AVERAGES_DIR if is_average(row) else "") / row["checkpoint"] / PREDICTIONS_FILE
    if not path.parent.is_dir() and row.get("checkpoint_path"):
        path = Path(row["checkpoint_path"]) / PREDICTIONS_FILE
    return path


def read_results(path: str | Path, warn: Callable[[str], None] = print) -> list[dict]:
    """Rows of eval_results.jsonl in file order; a line that is not a row (e.g. left by another tool, or cut off
    by hand) is reported through `warn` and ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, row, line in numbered_values(path.read_text(encoding="utf-8").splitlines()):
        if not isinstance(row, dict) or "checkpoint" not in row:
            warn(f"{path}: line {number} is not a results row and is ignored (and dropped at the next write): "
                 f"{line[:80]!r}")
            continue
        rows.append(row)
    return rows


def select_rows(rows: list[dict], fingerprint: str | None) -> list[dict]:
    """The rows scored with one set of evaluation settings (`eval_fingerprint`), the last one per checkpoint."""
    latest: dict[str, dict] = {}
    for row in rows:
        if row.get("eval_fingerprint") == fingerprint:
            latest[row["checkpoint"]] = row
    return list(latest.values())


def scored_names(rows: list[dict], fingerprint: str) -> set[str]:
    """Checkpoints that hold a row of these settings."""
    return {row["checkpoint"] for row in select_rows(rows, fingerprint)}


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Exclusive lock of `directory` itself (flock of a descriptor of the directory): nothing is created, so
    nothing is left behind. On NFS, where flock becomes a byte-range lock that needs a descriptor open for
    writing (EBADF for a directory), a hidden lock file in the directory is locked instead."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno != errno.EBADF:
                raise
            os.close(fd)
            fd = os.open(directory / f".{RESULTS_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def save_row(path: str | Path, row: dict, warn: Callable[[str], None] = print) -> None:
    """Add a results row, replacing an earlier row of the same checkpoint and eval_fingerprint (--force)."""
    path = Path(path)
    with locked(path.parent):
        key = (row["checkpoint"], row["eval_fingerprint"])
        rows = [r for r in read_results(path, warn) if (r["checkpoint"], r.get("eval_fingerprint")) != key]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in [*rows, row]))


def example_records(prompts: list[Prompt], predictions: list[Prediction], scores: list[dict[str, float]],
                    count_tokens: Callable[[str], int]) -> list[dict]:
    """One predictions line per example: id, prediction (as scored), reference, raw_prediction (the decoded output)
    where it differs from the prediction; prompt_tokens (the prompt generated from), reference_tokens and
    prediction_tokens (`count_tokens`: the run's tokenizer on the plain text, no special token, the same count for
    both); the ROUGE F-measures of `scores` (metrics.rouge_per_example)."""
    records = []
    for prompt, prediction, score in zip(prompts, predictions, scores):
        line = {"id": prompt.id, "prediction": prediction.text, "reference": prompt.reference}
        if prediction.raw != prediction.text:
            line["raw_prediction"] = prediction.raw
        line.update(prompt_tokens=len(prompt.input_ids), reference_tokens=count_tokens(prompt.reference),
                    prediction_tokens=count_tokens(prediction.text),
                    **{name: float(score[name]) for name in ROUGE_TYPES})
        records.append(line)
    return records


def write_predictions(target: Scored, records: list[dict], warn: Callable[[str], None] = print) -> None:
    """The predictions file of `target` (`example_records`), written whole."""
    path = predictions_path(target)
    if not path.parent.is_dir():  # deleted meanwhile (save_total_limit): the row still records the scores
        warn(f"{path.parent} is gone; its predictions are not written")
        return
    write_atomic(path, "".join(json.dumps(line) + "\n" for line in records))


def read_predictions(path: str | Path) -> list[dict]:
    """The lines of a predictions file (OSError / ValueError when it is missing or not JSON lines)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
