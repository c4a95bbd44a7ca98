"""The evaluation command line: settings -> an EvalJob (longctx.eval.job) -> the scoring loop
(longctx.eval.scoring) -> the report; or, with --preflight, what a launch of several processes would score.

    python experiments/009_text_summary/eval_checkpoint.py --config runs/009_text_summary/run_config.yaml \\
        --output_dir runs/009_text_summary --all_checkpoints [--follow] [--force] [--preflight]
"""

from __future__ import annotations

from .. import exit_status
from ..utils.distributed import print0
from . import rank_failures
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
    rank_failures.run_command(argv, parse_job, preflight, score_all)
