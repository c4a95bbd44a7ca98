"""The evaluation command line: settings -> an EvalJob (longctx.eval.job) -> the scoring loop
(longctx.eval.scoring) -> the report; or, with --preflight, what a launch of several processes would score.

    python experiments/009_text_summary/eval_checkpoint.py --config runs/009_text_summary/run_config.yaml \\
        --run_dir runs/009_text_summary --all_checkpoints [--follow] [--force] [--preflight]
"""

from __future__ import annotations

import sys

from ..config import ConfigError
from ..distributed import print0, teardown
from ..quiet import silence_unactionable_warnings
from ..records import DataError
from . import ranks
from .job import EvalJob, parse_job
from .scoring import WarnOnce, finish_report, pending_checkpoints, score_all

NOTHING_TO_SCORE = 3  # --preflight exit status: every checkpoint is already scored (the report was refreshed)


def preflight(job: EvalJob) -> int:
    """What a launch of several processes would do, in one process: 0 to go ahead, NOTHING_TO_SCORE when done."""
    if job.ev.follow:
        return 0
    todo, _ = pending_checkpoints(job, set(), WarnOnce(follow=False))
    if todo:
        print0(f"{len(todo)} checkpoint(s) to score: {', '.join(c.name for c in todo)}")
        return 0
    finish_report(job)
    return NOTHING_TO_SCORE


def main(argv: list[str] | None = None) -> None:
    silence_unactionable_warnings()
    try:
        job = parse_job(argv)
        if job.ev.preflight:
            sys.exit(preflight(job))
        status = score_all(job)
    except (ConfigError, DataError) as err:
        print0(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ranks.RankFailed as err:  # raised on every rank at the same collective
        print0(str(err), file=sys.stderr)
        teardown()  # after the print: the launcher stops every process once one exits
        sys.exit(err.failure.status)
    if status:
        sys.exit(status)
