"""The results store: RUN_DIR/eval_results.jsonl (one row per scored checkpoint) and CHECKPOINT/eval_predictions.jsonl.

A row is reused instead of scored again when its eval_fingerprint (longctx.eval.job.scoring_settings: a hash of
everything that changes the predictions or their scores) equals the current one. Rows are
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
from pathlib import Path
from typing import TYPE_CHECKING

from ..run.layout import PREDICTIONS_FILE, RESULTS_FILE
from ..utils.atomic_write import write_atomic

if TYPE_CHECKING:
    from ..run.checkpoints import Checkpoint
    from .generation import Prediction, Prompt


def read_results(path: str | Path, warn: Callable[[str], None] = print) -> list[dict]:
    """Rows of eval_results.jsonl in file order; a line that is not a row (e.g. left by another tool, or cut off
    by hand) is reported through `warn` and ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
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


def write_predictions(ckpt: Checkpoint, prompts: list[Prompt], predictions: list[Prediction],
                      warn: Callable[[str], None] = print) -> None:
    """CHECKPOINT/eval_predictions.jsonl: id, prediction (as scored), reference per validation prompt, and
    raw_prediction (the decoded output) where it differs from the prediction."""
    if not ckpt.path.is_dir():  # deleted meanwhile (save_total_limit): the row still records the scores
        warn(f"{ckpt.path} is gone; its predictions are not written")
        return
    lines = []
    for prompt, prediction in zip(prompts, predictions):
        line = {"id": prompt.id, "prediction": prediction.text, "reference": prompt.reference}
        if prediction.raw != prediction.text:
            line["raw_prediction"] = prediction.raw
        lines.append(json.dumps(line) + "\n")
    write_atomic(ckpt.path / PREDICTIONS_FILE, "".join(lines))
