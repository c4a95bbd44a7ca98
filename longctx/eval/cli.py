"""The evaluation command line: settings -> an EvalJob (longctx.eval.job) -> the scoring loop
(longctx.eval.scoring) -> the report; or, with --preflight, what a launch of several processes would score.

    python experiments/009_text_summary/eval_checkpoint.py --config runs/009_text_summary/run_config.yaml \\
        --output_dir runs/009_text_summary --all_checkpoints [--follow] [--force] [--preflight]
"""

from __future__ import annotations

import sys

from .. import exit_status
from ..errors import ConfigError, DataError, RankFailed
from ..utils.distributed import print0, teardown
from ..utils.warning_filters import silence_unactionable_warnings
from .job import EvalJob, parse_job
from .scoring import WarnOnce, describe, finish_report, pending_checkpoints, score_all


def preflight(job: EvalJob) -> int:
    """What a launch of several processes would do, in one process: OK to go ahead, NOTHING_TO_SCORE when done."""
    if job.options.follow:
        return exit_status.OK
    todo, _ = pending_checkpoints(job, set(), WarnOnce(follow=False))
    if todo:
        print0(f"{describe(todo)} to score: {', '.join(c.name for c in todo)}")
        return exit_status.OK
    finish_report(job)
    return exit_status.NOTHING_TO_SCORE


def main(argv: list[str] | None = None) -> None:
    silence_unactionable_warnings()
    try:
        job = parse_job(argv)
        if job.options.preflight:
            sys.exit(preflight(job))
        status = score_all(job)
    except (ConfigError, DataError) as err:
        print0(f"error: {err}", file=sys.stderr)
        sys.exit(exit_status.BAD_INPUT)
    except RankFailed as err:  # raised on every rank at the same collective
        print0(str(err), file=sys.stderr)
        teardown()  # after the print: the launcher stops every process once one exits
        sys.exit(err.failure.status)
    if status:
        sys.exit(status)
