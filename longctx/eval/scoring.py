"""The scoring loop: what to score now (the base model, then complete checkpoints, then an average of checkpoints
(--average / --average_last: its adapter written by rank 0 under OUTPUT_DIR/averages/ before any rank loads it), not
yet scored with these settings), each one's predictions on every rank, its predictions file and results row, W&B and
the report on rank 0. Every step where the other ranks wait for rank 0, or for each other, goes through
`rank_failures`, so a failure anywhere stops every rank."""

from __future__ import annotations

import functools
import json
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch

from .. import exit_status
from ..errors import ConfigError
from ..model import averaging
from ..planner.evaluation import shared_gpus_warning
from ..planner.runplan import make_evaluation_plan
from ..run import checkpoints
from ..run.directory import git_state, visible_gpus
from ..run.layout import AVERAGES_DIR, FINAL_ADAPTER, RUN_INFO
from ..utils.distributed import print0, teardown, use_timeout_for_new_groups
from . import rank_failures, report, results
from .generation import Evaluator, Prediction
from .job import EvalArguments, EvalJob
from .metrics import ROUGE_TYPES, fmeasures, means_with_intervals, score_pairs
from .results import Average, BaseModel, Scored
from .wandb_log import WandbLogger


class WarnOnce:
    """Prints each distinct warning once (rank 0): a --follow poll looks at the same incomplete checkpoint every
    few seconds until its save finishes."""

    def __init__(self, follow: bool):
        self.suffix = " (looked at again at the next poll)" if follow else ""
        self.seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self.seen:
            self.seen.add(message)
            print0(message + self.suffix)


def pending_checkpoints(job: EvalJob, done: set[str], warn: WarnOnce) -> tuple[list[Scored], bool]:
    """(what to score now: the base model first, unless --no_base or --checkpoint, then checkpoints in step order,
    then the average of --average / --average_last; whether final_adapter is among the checkpoints found). Rank 0
    only. `done`: the names this invocation has scored or found scored; those found scored now are added to it.

    Raises ConfigError when, without --follow, the run holds no complete checkpoint at all, or when the average's
    members are not complete checkpoints of the run that can be averaged."""
    rows = results.select_rows(results.read_results(job.results_path, warn), job.fingerprint)
    already = {row["checkpoint"] for row in rows}
    if job.single:
        found = [job.single]
    else:  # checkpoints already scored (or scored by this invocation) are not verified again
        found = checkpoints.find_checkpoints(job.output_dir, warn=warn,
                                             known_complete=done if job.options.force else already | done)
    if not found and not job.options.follow:
        raise ConfigError(f"setting 'output_dir' = {str(job.output_dir)!r}: holds no complete checkpoint yet; wait "
                          f"for training to save one, or add --follow to score them as they appear.")
    candidates: list[Scored] = ([BaseModel(job.output_dir)] if job.scores_base else []) + found
    if job.scores_average:
        average = average_target(job, found)
        scored = next((row for row in rows if row["checkpoint"] == average.name), None)
        if scored is not None and scored.get("average_sha256") != average.member_sha256:
            already.discard(average.name)  # its members' adapters changed since: scored again
        candidates.append(average)
    todo, skipped = [], []
    for ckpt in candidates:
        if ckpt.name in done:
            continue
        if ckpt.name in already and not job.options.force:
            skipped.append(ckpt.name)
            done.add(ckpt.name)
        else:
            todo.append(ckpt)
    if skipped:
        print0(f"already scored with these settings (eval_fingerprint {job.fingerprint}), skipped: "
               f"{', '.join(skipped)}; --force scores them again")
    return todo, any(c.name == FINAL_ADAPTER for c in found)


def average_target(job: EvalJob, found: list[checkpoints.Checkpoint]) -> Average:
    """The average of --average NAME ... or --average_last K among the run's complete checkpoints `found`: its
    members checked (longctx.model.averaging), its adapter directory OUTPUT_DIR/averages/<name>. ConfigError when
    they are not complete checkpoints of the run that can be averaged."""
    options = job.options
    if options.average is not None:
        by_name = {c.name: c for c in found}
        if all(name in by_name for name in options.average):  # complete (verified now, or scored before)
            chosen = averaging.check_choice([by_name[name] for name in options.average], "average",
                                            "[" + ", ".join(options.average) + "]")
        else:  # checked when the evaluation started, gone or incomplete since: the same message as then
            chosen = averaging.named_checkpoints(job.output_dir, options.average)
        setting = "average"
    else:
        chosen = averaging.last_complete(found, options.average_last, job.output_dir)
        setting = "average_last"
    members = averaging.load_members(chosen, setting)
    name = averaging.average_name(members)
    return Average(job.output_dir / AVERAGES_DIR / name, members[-1].global_step, tuple(members))


def prepare_average(target: Average, git_commit: str | None = None) -> averaging.TruncationError:
    """Rank 0, before the average is scored: its adapter directory, written from its members unless already
    written from exactly these (names, steps, adapter sha256). Prints what was averaged and what rank r would
    cost. Returns the truncated-SVD error report."""
    members = list(target.members)
    report = averaging.written_average(target.path, members)
    if report is None:
        report = averaging.write_average(members, target.path, git_commit)
        print0(f"wrote {target.path}: {averaging.describe(members, report)}")
    else:
        print0(f"{target.path} (written earlier from the same adapters): {averaging.describe(members, report)}")
    return report


def prediction_counts(predictions: list[Prediction]) -> dict[str, int]:
    """How many predictions were empty, had a reasoning block removed, or stopped at max_new_tokens."""
    return {"num_empty": sum(not p.text for p in predictions),
            "num_think_stripped": sum(p.think_stripped for p in predictions),
            "num_hit_max_new_tokens": sum(p.hit_max_new_tokens for p in predictions)}


def describe(todo: list[Scored]) -> str:
    """'the base model and 4 checkpoint(s)', '4 checkpoint(s)', 'the base model', 'the base model, 4 checkpoint(s)
    and 1 average'."""
    averages = sum(isinstance(t, Average) for t in todo)
    adapters = sum(not isinstance(t, BaseModel | Average) for t in todo)
    parts = ["the base model"] if len(todo) > adapters + averages else []
    parts += ([f"{adapters} checkpoint(s)"] if adapters else []) + ([f"{averages} average"] if averages else [])
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)


def mean_tokens(records: list[dict], key: str) -> float:
    return round(sum(r[key] for r in records) / len(records), 2)


def average_fields(target: Average, report: averaging.TruncationError) -> dict:
    """What an average's row records besides the scores: its members, their steps and adapter sha256 (the row is
    reused only while these are the members' adapters), its rank, and what the members' rank would cost."""
    return {"average_of": [m.name for m in target.members], "average_steps": [m.global_step for m in target.members],
            "average_sha256": target.member_sha256, "average_rank": sum(m.rank for m in target.members),
            "truncated_svd_error": report.record()}


def results_row(job: EvalJob, target: Scored, evaluator: Evaluator, predictions: list[Prediction], scores: dict,
                records: list[dict], seconds: float, num_processes: int,
                average: averaging.TruncationError | None = None) -> dict:
    """One results row: `scores` (metrics.means_with_intervals), `records` (results.example_records); `average`:
    the truncated-SVD report of an Average."""
    return {
        "checkpoint": target.name, "global_step": target.global_step, **scores,
        "num_examples": len(evaluator.prompts), "num_dropped_for_length": evaluator.dropped,
        **prediction_counts(predictions),
        "mean_prediction_tokens": mean_tokens(records, "prediction_tokens"),
        "mean_reference_tokens": mean_tokens(records, "reference_tokens"),
        "num_references_over_max_new_tokens": evaluator.references_over,
        "reference_tokens_p95": evaluator.reference_tokens_p95,
        "validation_file": job.data.validation_file, "validation_sha256": job.scoring_settings["validation_sha256"],
        "chat_template": job.scoring_settings["chat_template"],
        "chat_template_sha256": job.scoring_settings["chat_template_sha256"],
        "generation": evaluator.generation_used, "eval_fingerprint": job.fingerprint,
        **({} if isinstance(target, BaseModel) else {"checkpoint_path": str(target.path.resolve())}),
        **(average_fields(target, average) if isinstance(target, Average) else {}),
        "num_processes": num_processes,
        "seconds": round(seconds, 2), "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def finish_report(job: EvalJob) -> report.Findings | None:
    """Summary, plots and best_checkpoint link for the rows of the current settings; prints the table and the best
    checkpoint's paired comparisons. Returns the findings (None without rows)."""
    every_row = results.read_results(job.results_path, print0)
    rows = results.select_rows(every_row, job.fingerprint)
    if not rows:
        print0("no results with these settings yet")
        return None
    findings = report.analyse(job.output_dir, rows, job.options.length_buckets,
                              job.options.length_bucket_min_examples)
    paths = report.write_report(job.output_dir, rows, findings)
    print0(report.format_table(rows))
    if findings.best_line:
        print0(f"{findings.best['checkpoint']}: {findings.best_line}")
    others = len(every_row) - len(rows)
    if others:
        print0(f"({others} row(s) of {job.results_path.name} scored with other settings are not shown)")
    print0(f"results: {job.results_path}")
    for name, path in paths.items():
        print0(f"{name}: {path}")
    return findings


class Scoring:
    """The scoring loop of one process. Rank 0 alone decides what to score, writes rows and reports; every rank
    generates its share of each checkpoint's predictions."""

    def __init__(self, job: EvalJob, state):
        self.job, self.state = job, state
        self.evaluator = Evaluator(job, state, plan=self.plan_evaluation)
        self.warn = WarnOnce(job.options.follow)
        self.logger: WandbLogger | None = None
        self.done: set[str] = set()
        self.last_new = time.monotonic()
        self.average_reports: dict[str, averaging.TruncationError] = {}  # rank 0: of the averages written

    def next_round(self) -> tuple[list[Scored], bool, int]:
        """Rank 0: (what to score now, whether to stop after it, exit status)."""
        options = self.job.options
        todo, final_found = pending_checkpoints(self.job, self.done, self.warn)
        stop, status = not options.follow or final_found, 0
        for target in todo:  # written before any rank loads it
            if isinstance(target, Average):
                self.average_reports[target.name] = prepare_average(target, git_state().commit)
        if todo:
            self.last_new = time.monotonic()
            print0(f"scoring {describe(todo)} of {self.job.output_dir} on {self.job.data.validation_file} "
                   f"with {self.state.num_processes} process(es): {', '.join(c.name for c in todo)}")
        elif options.follow and options.follow_timeout_seconds is not None and \
                time.monotonic() - self.last_new > options.follow_timeout_seconds:
            print0(f"--follow: no new checkpoint in {options.follow_timeout_seconds:g} s and no {FINAL_ADAPTER} in "
                   f"{self.job.output_dir}; stopping (did training stop early?). Rerun to score what appears later.",
                   file=sys.stderr)
            stop, status = True, 1
        return todo, stop, status

    def plan_evaluation(self, prompt_tokens: list[int]) -> None:
        """Between the tokenized prompts and the weights: the evaluation plan (longctx.planner), once. A prompt +
        max_new_tokens past max_position_embeddings is refused (exit 2); on GPUs the plan is printed, with a warning
        when it does not fit one GPU; on a CPU one line. With --follow, a warning when the training run holds these
        GPUs."""
        job = self.job
        cuda = torch.cuda.is_available()
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 80.0
        scorings = 1 if job.single else \
            len(checkpoints.checkpoint_dirs(job.output_dir)) + job.scores_base + job.scores_average
        plan = make_evaluation_plan(job.model, job.lora, job.generation, prompt_tokens, self.state.num_processes,
                                    gpu_memory_gib=gpu_gib, checkpoints=max(scorings, 1),
                                    where=f" in {job.data.validation_file}")
        if plan.exit_status == exit_status.BAD_INPUT:
            raise ConfigError(plan.text.removeprefix("error: "))
        if not cuda:
            print0(f"evaluation plan: CPU, {len(prompt_tokens)} prompts, the longest {max(prompt_tokens):,} tokens "
                   f"+ max_new_tokens {job.generation.max_new_tokens}, within the model's context (PLAN=1 of training "
                   f"prints the GPU plan)")
            return
        print0(plan.text)
        if plan.exit_status == exit_status.DOES_NOT_FIT:
            print0("warning: the evaluation plan above does not fit one GPU; lower generation_batch_size or "
                   "max_new_tokens, or expect an out-of-memory error", file=sys.stderr)
        if job.options.follow:
            warning = follow_warning(job.output_dir)
            if warning:
                print0(warning, file=sys.stderr)

    def record(self, target: Scored, predictions: list[Prediction], seconds: float) -> None:
        """Rank 0: predictions file, W&B, results row, and the line that says the checkpoint is scored."""
        evaluator = self.evaluator
        per_example = score_pairs([p.text for p in predictions], [p.reference for p in evaluator.prompts])
        records = results.example_records(evaluator.prompts, predictions, fmeasures(per_example),
                                          evaluator.count_tokens)
        row = results_row(self.job, target, evaluator, predictions, means_with_intervals(per_example), records,
                          seconds, self.state.num_processes, self.average_reports.get(target.name))
        results.write_predictions(target, records, print0)
        if "wandb" in self.job.options.report_to:
            self.logger = self.logger or WandbLogger(self.job.output_dir, self.job.options.run_name, self.job.fingerprint,
                                                     self.job.options.force)
            self.logger.log(row, records)
        results.save_row(self.job.results_path, row, print0)
        print0(f"scored {target.name} (step {target.global_step}): "
               + ", ".join(f"{m} {row[m]:.4f} [{row[m + '_low']:.3f}, {row[m + '_high']:.3f}]" for m in ROUGE_TYPES)
               + f"; empty {row['num_empty']}/{row['num_examples']}; think stripped {row['num_think_stripped']}; "
                 f"hit max_new_tokens {row['num_hit_max_new_tokens']}; references over max_new_tokens "
                 f"{row['num_references_over_max_new_tokens']}; tokens predicted / reference "
                 f"{row['mean_prediction_tokens']:.1f} / {row['mean_reference_tokens']:.1f}; {row['seconds']:.1f} s")

    def run(self) -> int:
        """Score until nothing is left (with --follow: until final_adapter is scored). Returns the exit status."""
        while True:
            todo, stop, status = rank_failures.from_main(self.state, "looking for checkpoints", self.next_round)
            for ckpt in todo:
                start = time.perf_counter()
                predictions = self.evaluator.predict(ckpt)
                self.done.add(ckpt.name)
                seconds = time.perf_counter() - start
                rank_failures.from_main(self.state, f"writing the results of {ckpt.name}",
                                functools.partial(self.record, ckpt, predictions, seconds))
            if stop:
                break
            time.sleep(self.job.options.follow_poll_seconds)
        rank_failures.from_main(self.state, "writing the report", self.report)
        return status

    def report(self) -> None:
        """Rank 0: the report, and the length table into W&B when this invocation logged rows there."""
        findings = finish_report(self.job)
        if self.logger and findings:
            self.logger.log_length_table(findings)


def follow_warning(run_dir: Path) -> str | None:
    """--follow alongside a training run that is still going (no final_adapter) on this machine: the warning naming
    the GPUs both would use (run_info.json records the training's machine and GPUs), or None."""
    try:
        machine = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8")).get("machine", {})
    except (OSError, ValueError):
        return None
    if (run_dir / FINAL_ADAPTER).exists() or not machine:
        return None
    return shared_gpus_warning(visible_gpus(), machine.get("gpus", []), machine.get("host") == socket.gethostname())


def process_state(options: EvalArguments):
    """accelerate's PartialState of this evaluation process: its process group (gloo without CUDA, where cpu=True is
    what makes accelerate build one for N processes) waits ddp_timeout at a collective, and so do groups made later."""
    from accelerate import PartialState

    use_timeout_for_new_groups(options.ddp_timeout)
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=options.ddp_timeout))


def score_all(job: EvalJob) -> int:
    """The scoring loop on every process of the launch (one, or accelerate's N). Returns the exit status."""
    scoring = Scoring(job, process_state(job.options))
    try:
        status = scoring.run()
    finally:
        if scoring.logger:
            scoring.logger.finish()
    teardown()
    return status
