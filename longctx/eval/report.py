"""The progression of a run at a glance, and the three questions it exists for: did fine-tuning beat the base
model, is the best checkpoint really better than the others, does quality hold as documents get longer.

    python -m longctx.eval.report runs/000_tiny_smoke     # redraw; eval_all_checkpoints.sh does this after scoring

Writes into the run directory:
  eval_summary.md     table by step, the base model (step 0) first (ROUGE with 95% bootstrap intervals, eval loss,
                      mean prediction / reference tokens; predictions empty, with a reasoning block removed, stopped
                      by max_new_tokens), the best checkpoint by ROUGE-Lsum (never the base) with its paired
                      differences to the base model, the final adapter and every other checkpoint, ROUGE-Lsum by
                      prompt length, the best by eval loss, the generation settings
  rouge_by_step.png   ROUGE-1/2/L/Lsum against global step (the base model at 0), interval bands, best starred
  rouge_by_step.csv   the plotted points: step, checkpoint, each metric with its interval (_low, _high)
  rouge_by_length.png ROUGE-Lsum by prompt-length bucket for the base model, the best checkpoint and final_adapter
  rouge_by_length.csv the plotted points: bucket, its bounds and prompt tokens seen, n, checkpoint, the interval
  loss_curve.png      train and eval loss from trainer_state.json, checkpoint steps and the best one marked
  loss_curve.csv      the plotted points: step, train_loss, eval_loss (empty where not logged at that step)
  best_checkpoint     symbolic link (relative) to the best checkpoint by ROUGE-Lsum

An average of checkpoints (a row with average_of) is listed after the checkpoints, compared with the best on the same
examples, and never the best itself (best_row says why); it is not a point of the step plot or the loss curve.

Everything here reads results rows, predictions files (per-example scores and prompt lengths: the paired and length
analyses, longctx.eval.analysis) and trainer_state.json; nothing loads a model.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..run import checkpoints
from ..run.layout import (
    BASE_MODEL,
    BEST_LINK,
    FINAL_ADAPTER,
    LENGTH_CSV,
    LENGTH_PLOT,
    LOSS_CSV,
    LOSS_PLOT,
    RESULTS_FILE,
    ROUGE_CSV,
    ROUGE_PLOT,
    SUMMARY_FILE,
    TRAINER_STATE,
)
from ..utils.atomic_write import atomic_path, write_atomic
from . import analysis
from .analysis import Bucket, Interval
from .metrics import ROUGE_TYPES
from .results import is_average, read_predictions, read_results, row_predictions_path, select_rows

LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


def by_step(rows: list[dict]) -> list[dict]:
    """Rows in step order; at equal steps checkpoint-N before final_adapter (they hold the same weights); averages of
    checkpoints last (no point of training: they sit after it), by their last member's step."""
    return sorted(rows, key=lambda r: (is_average(r), r["global_step"], r["checkpoint"] == FINAL_ADAPTER,
                                       r["checkpoint"]))


def best_row(rows: list[dict], metric: str = "rougeLsum") -> dict | None:
    """Highest `metric` among the trained checkpoints (never the base model, never an average of checkpoints); ties
    go to the earliest step.

    Why not an average: the best is a point of training (a step on the curves, with its eval loss and a checkpoint to
    resume or deploy); an average is chosen after looking at these very scores, and its members were picked on them
    too, so calling it best when it tops the table by a hair would be winner's curse on the validation set. Its row
    is compared with the best on the same examples instead (paired difference): the report says whether the average
    is better, by how much, and whether the examples support it."""
    rows = [r for r in by_step(rows) if r.get(metric) is not None and r["checkpoint"] != BASE_MODEL
            and not is_average(r)]
    return max(rows, key=lambda r: r[metric]) if rows else None


def latest_trainer_state(run_dir: str | Path) -> dict:
    """trainer_state.json of the latest checkpoint: its log_history holds every loss logged up to it."""
    for path in reversed(checkpoints.checkpoint_dirs(run_dir)):
        if not (path / TRAINER_STATE).is_file():
            continue
        try:
            return checkpoints.read_trainer_state(path)
        except (OSError, ValueError):  # being written, or damaged: fall back to the one before
            continue
    return {}


def eval_losses(trainer_state: dict) -> dict[int, float]:
    """global step -> eval loss logged at that step."""
    return {int(e["step"]): float(e["eval_loss"]) for e in trainer_state.get("log_history", [])
            if "eval_loss" in e and "step" in e}


def train_losses(trainer_state: dict) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["loss"])) for e in trainer_state.get("log_history", [])
            if "loss" in e and "step" in e]


def _cell(row: dict, metric: str) -> str:
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    if low is None or high is None:
        return f"{row[metric]:.4f}"
    return f"{row[metric]:.4f} [{low:.3f}, {high:.3f}]"


# ---- the paired and length analyses, from the predictions files --------------------------------------------------

@dataclass(frozen=True)
class Examples:
    """One row's predictions file, in prompt order: what the analyses read."""

    ids: tuple[str, ...]
    rouge_lsum: tuple[float, ...]
    prompt_tokens: tuple[int, ...]


def read_examples(run_dir: str | Path, row: dict) -> Examples | str:
    """The per-example records of a row's predictions file, or why they cannot be used (one phrase)."""
    path = row_predictions_path(run_dir, row)
    try:
        lines = read_predictions(path)
    except FileNotFoundError:
        return f"no {path.name} (deleted with its checkpoint, e.g. by save_total_limit)"
    except (OSError, ValueError) as err:
        return f"{path.name} is unreadable ({err})"
    if not lines or any("rougeLsum" not in line or "prompt_tokens" not in line for line in lines):
        return f"{path.name} has no per-example scores (scored before they were recorded; --force scores it again)"
    mean = sum(line["rougeLsum"] for line in lines) / len(lines)
    if len(lines) != row.get("num_examples") or abs(mean - row["rougeLsum"]) > 1e-9:
        return f"{path.name} holds other predictions than its row (scored again since, with other settings)"
    return Examples(tuple(str(line["id"]) for line in lines), tuple(float(line["rougeLsum"]) for line in lines),
                    tuple(int(line["prompt_tokens"]) for line in lines))


@dataclass
class Findings:
    """What the predictions files say beyond the table: the best checkpoint minus every other row on the same
    examples (paired), and ROUGE-Lsum by prompt-length bucket for the base model, the best checkpoint and
    final_adapter."""

    best: dict | None = None
    left_out: dict[str, str] = field(default_factory=dict)  # row -> why its examples are not in the analysis
    paired: list[tuple[dict, Interval]] = field(default_factory=list)  # (other row, best minus other), by step
    prompt_tokens: tuple[int, ...] = ()
    buckets: list[Bucket] = field(default_factory=list)
    bucket_rule: str = ""
    by_length: list[tuple[dict, list[Interval]]] = field(default_factory=list)  # (row, one interval per bucket)

    def difference(self, name: str) -> Interval | None:
        """The best checkpoint minus row `name`, or None when not compared."""
        return next((d for r, d in self.paired if r["checkpoint"] == name), None)

    @property
    def not_distinguishable(self) -> list[str]:
        """Trained checkpoints whose paired interval of the difference to the best includes 0."""
        return [r["checkpoint"] for r, d in self.paired if r["checkpoint"] != BASE_MODEL and not d.excludes_zero]

    @property
    def best_line(self) -> str:
        """The best checkpoint's paired differences to the base model and to final_adapter, and the checkpoints it
        is not distinguishable from. Empty when there is no paired analysis."""
        if not self.best or not self.paired:
            return ""
        parts = []
        averages = [(r["checkpoint"], r["checkpoint"]) for r, _ in self.paired if is_average(r)]
        for name, label in ((BASE_MODEL, "base model"), (FINAL_ADAPTER, FINAL_ADAPTER), *averages):
            difference = self.difference(name)
            if difference is not None:
                verdict = "excludes" if difference.excludes_zero else "includes"
                parts.append(f"{label} {_signed(difference)}, {verdict} 0")
        same = self.not_distinguishable
        line = ("Paired differences (best minus other, 95% interval): " + "; ".join(parts) + ". ") if parts else ""
        return line + (f"Not distinguishable from (paired interval includes 0): {', '.join(same)}." if same else
                       "Distinguishable from every other checkpoint (every paired interval excludes 0).")


def _signed(interval: Interval) -> str:
    if interval.low is None:
        return f"{interval.mean:+.4f} (no interval: one example)"
    return f"{interval.mean:+.4f} [{interval.low:+.3f}, {interval.high:+.3f}]"


def _interval_cell(interval: Interval) -> str:
    if interval.low is None:
        return f"{interval.mean:.4f}"
    return f"{interval.mean:.4f} [{interval.low:.3f}, {interval.high:.3f}]"


def bucket_rule(edges: list[int] | None, min_examples: int, buckets: list[Bucket], num_examples: int) -> str:
    if edges is not None:
        return (f"prompt-token edges {', '.join(f'{e:,}' for e in edges)} (length_buckets); a bucket with fewer than "
                f"{min_examples} examples is merged with a neighbour, an empty one left out")
    rule = (f"quantiles of the prompt token counts (up to {analysis.MAX_QUANTILE_BUCKETS}) with at least "
            f"{min_examples} examples each (length_bucket_min_examples)")
    if len(buckets) == 1:
        rule += f"; {num_examples} examples are fewer than 2 x {min_examples}: one bucket"
    return rule


def analyse(run_dir: str | Path, rows: list[dict], length_buckets: list[int] | None = None,
            min_examples: int = 5) -> Findings:
    """The paired comparisons and the length table of these rows, from their predictions files. A row whose file
    is missing, has no per-example scores, or holds other predictions than the row is left out (`left_out`)."""
    rows = by_step(rows)
    findings = Findings(best=best_row(rows))
    examples: dict[str, Examples] = {}
    for row in rows:
        read = read_examples(run_dir, row)
        if isinstance(read, str):
            findings.left_out[row["checkpoint"]] = read
        else:
            examples[row["checkpoint"]] = read
    best = findings.best["checkpoint"] if findings.best else None
    reference = examples.get(best) or next(iter(examples.values()), None)
    if reference is None:
        return findings
    for name, read in list(examples.items()):
        if read.ids != reference.ids:
            findings.left_out[name] = "its examples are not the others' (other validation data)"
            del examples[name]
    if best in examples:
        findings.paired = [(row, analysis.paired_difference(examples[best].rouge_lsum,
                                                             examples[row["checkpoint"]].rouge_lsum))
                           for row in rows if row["checkpoint"] in examples and row["checkpoint"] != best]
    findings.prompt_tokens = reference.prompt_tokens
    findings.buckets = analysis.length_buckets(reference.prompt_tokens, length_buckets, min_examples)
    findings.bucket_rule = bucket_rule(length_buckets, min_examples, findings.buckets, len(reference.ids))
    shown = [BASE_MODEL, best, FINAL_ADAPTER]
    for row in rows:
        name = row["checkpoint"]
        if name in examples and name in shown and not any(r["checkpoint"] == name for r, _ in findings.by_length):
            findings.by_length.append((row, analysis.by_bucket(examples[name].rouge_lsum, findings.buckets)))
    return findings


def _model_label(row: dict, best: dict | None) -> str:
    return f"{row['checkpoint']} (best)" if best is not None and row["checkpoint"] == best["checkpoint"] \
        else row["checkpoint"]


def _tokens_cell(row: dict) -> str:
    if row.get("mean_prediction_tokens") is None or row.get("mean_reference_tokens") is None:
        return ""
    return f"{row['mean_prediction_tokens']:.1f} / {row['mean_reference_tokens']:.1f}"


def analysis_markdown(findings: Findings) -> list[str]:
    """The summary's sections on the paired comparisons and on ROUGE-Lsum by prompt length."""
    lines = []
    best = findings.best
    if findings.left_out:
        lines += ["- Left out of the paired and length analysis: "
                  + "; ".join(f"{name}: {why}" for name, why in findings.left_out.items()) + ".", ""]
    if findings.paired:
        n = findings.paired[0][1].n
        lines += [f"## Is {best['checkpoint']} better? Paired differences in ROUGE-Lsum", "",
                  f"{best['checkpoint']} minus each other row on the same {n} examples: the mean difference and its "
                  f"95% paired bootstrap interval (scipy.stats.bootstrap, paired=True, percentile, "
                  f"{analysis.RESAMPLES:,} resamples, seed {analysis.SEED}). An interval that excludes 0 is a "
                  f"difference the examples support; one that includes 0 is not distinguishable.", "",
                  "| other | step | its ROUGE-Lsum | best minus other [95% interval] | excludes 0 |",
                  "|---|---:|---:|---:|---|"]
        for row, difference in findings.paired:
            lines.append(f"| {row['checkpoint']} | {row['global_step']} | {row['rougeLsum']:.4f} | "
                         f"{_signed(difference)} | {'yes' if difference.excludes_zero else 'no'} |")
        lines.append("")
    if findings.by_length:
        header = [_model_label(row, best) for row, _ in findings.by_length]
        lines += ["## ROUGE-Lsum by prompt length", "",
                  f"Buckets: {findings.bucket_rule}. Each cell: mean ROUGE-Lsum of the bucket's examples [95% "
                  f"bootstrap interval] (scipy.stats.bootstrap, percentile, seed {analysis.SEED}).", "",
                  "| prompt tokens | seen | n | " + " | ".join(header) + " |",
                  "|---|---|---:|" + "---:|" * len(header)]
        for i, bucket in enumerate(findings.buckets):
            seen = [findings.prompt_tokens[j] for j in bucket.indices]
            lines.append(f"| {bucket.label} | {min(seen):,}-{max(seen):,} | {len(bucket.indices)} | "
                         + " | ".join(_interval_cell(intervals[i]) for _, intervals in findings.by_length) + " |")
        lines += ["", f"![ROUGE-Lsum by prompt length]({LENGTH_PLOT})", ""]
    return lines


def summary_markdown(rows: list[dict], trainer_state: dict, run_dir: str | Path = ".",
                     findings: Findings | None = None) -> str:
    rows = by_step(rows)
    losses = eval_losses(trainer_state)
    best = best_row(rows)
    findings = findings or Findings(best=best)
    with_loss = [r for r in rows if r["global_step"] in losses and r["checkpoint"] != BASE_MODEL
                 and not is_average(r)]
    best_loss = min(with_loss, key=lambda r: losses[r["global_step"]]) if with_loss else None
    lines = [f"# Evaluation of {Path(run_dir).resolve().name}", ""]
    if rows:
        latest = rows[-1]
        if latest.get("validation_file"):
            dropped = latest.get("num_dropped_for_length") or 0
            lines.append(f"- Validation data: `{latest['validation_file']}` (sha256 "
                         f"{str(latest.get('validation_sha256', ''))[:12]}), {latest['num_examples']} examples"
                         + (f", {dropped} dropped for length." if dropped else "."))
        if latest.get("generation"):
            lines.append("- Generation: " + ", ".join(f"{k}={v}" for k, v in latest["generation"].items()) + ".")
        if latest.get("num_references_over_max_new_tokens") is not None:
            lines.append(f"- References longer than max_new_tokens={latest['generation']['max_new_tokens']} tokens "
                         f"(summary + end of turn): {latest['num_references_over_max_new_tokens']} of "
                         f"{latest['num_examples']}; max_new_tokens={latest['reference_tokens_p95']} would cover 95% "
                         f"of them.")
        lines.append("- ROUGE: rouge_score, stemmed, F-measure as fractions; [low, high] is the 95% bootstrap "
                     "interval. Empty predictions score 0. Reasoning blocks (`<think>...</think>`) are removed "
                     "before scoring (column think); column max: predictions stopped by max_new_tokens.")
        lines.append("- Row `base` (step 0): the base model without adapter, the same prompts and generation. Column "
                     "tokens: mean prediction / mean reference tokens (the run's tokenizer, plain text).")
        for r in rows:
            if is_average(r):
                lines.append(f"- Row `{r['checkpoint']}`: the exact average of the LoRA updates of "
                             f"{', '.join(r['average_of'])} (an adapter of rank {r.get('average_rank', '?')}; step: "
                             f"its last member's), never the best: the paired table compares it with the best.")
        lines.append("")
    if best:
        lines.append(f"**Best by ROUGE-Lsum:** {best['checkpoint']} (step {best['global_step']}): "
                     f"ROUGE-Lsum {_cell(best, 'rougeLsum')}." + (f" {findings.best_line}" if findings.best_line
                                                                  else "") + "  ")
    if best_loss:
        lines.append(f"**Best by eval loss:** {best_loss['checkpoint']} (step {best_loss['global_step']}): "
                     f"eval loss {losses[best_loss['global_step']]:.4f}.")
    elif rows:
        lines.append("**Best by eval loss:** no eval loss in trainer_state.json at the scored steps.")
    counts = ("num_empty", "num_think_stripped", "num_hit_max_new_tokens")
    lines += ["", "| checkpoint | step | " + " | ".join(LABELS[m] for m in ROUGE_TYPES)
              + " | eval loss | tokens | empty | think | max | n |",
              "|---|---:|" + "---:|" * len(ROUGE_TYPES) + "---:|" * (len(counts) + 3)]
    for r in rows:
        name = f"**{r['checkpoint']}**" if r is best else r["checkpoint"]
        loss = None if is_average(r) else losses.get(r["global_step"])  # no eval loss of its own
        lines.append(f"| {name} | {r['global_step']} | " + " | ".join(_cell(r, m) for m in ROUGE_TYPES)
                     + f" | {'' if loss is None else f'{loss:.4f}'} | {_tokens_cell(r)} | "
                     + " | ".join(str(r.get(c, "")) for c in counts) + f" | {r['num_examples']} |")
    if not rows:
        lines.append("| (no checkpoint scored yet) |" + " |" * (len(ROUGE_TYPES) + len(counts) + 4))
    lines += ["", *analysis_markdown(findings)]
    lines += [f"![ROUGE by step]({ROUGE_PLOT})", "", f"![Loss]({LOSS_PLOT})", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on clusters or CI
    import matplotlib.pyplot as plt

    return plt


def rouge_points(rows: list[dict]) -> list[dict]:
    """What rouge_by_step.png plots, one point per step (final_adapter only where no checkpoint-N has its step):
    step, checkpoint, each metric and its interval (None where the row has none)."""
    points, seen = [], set()
    for r in by_step(rows):
        if r["global_step"] in seen or is_average(r):  # an average is no point of training
            continue
        seen.add(r["global_step"])
        point = {"step": r["global_step"], "checkpoint": r["checkpoint"]}
        for metric in ROUGE_TYPES:
            point.update({metric: r[metric], f"{metric}_low": r.get(f"{metric}_low"),
                          f"{metric}_high": r.get(f"{metric}_high")})
        points.append(point)
    return points


def loss_points(trainer_state: dict) -> list[dict]:
    """What loss_curve.png plots, by step: train_loss and eval_loss (None where not logged at that step)."""
    train, evals = dict(train_losses(trainer_state)), eval_losses(trainer_state)
    return [{"step": step, "train_loss": train.get(step), "eval_loss": evals.get(step)}
            for step in sorted(set(train) | set(evals))]


def write_csv(path: str | Path, points: list[dict]) -> Path:
    """The plotted points beside the plot, so the numbers behind a picture can be read or replotted; an absent
    value is an empty cell."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(points[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(points)
    return write_atomic(path, text.getvalue())


# Each metric its own marker and line style, drawn so that coinciding values stay visible: ROUGE-L's hollow marker is
# larger than ROUGE-Lsum's filled one (the two are often equal on short summaries).
METRIC_STYLES = {"rouge1": dict(marker="o", linestyle="-", markersize=5),
                 "rouge2": dict(marker="s", linestyle="--", markersize=5),
                 "rougeL": dict(marker="D", linestyle="-.", markersize=8, fillstyle="none"),
                 "rougeLsum": dict(marker="o", linestyle=":", markersize=3.5)}


def _step_axis(ax, steps: list[int]) -> None:
    """Whole steps only: ticks at the checkpoints when there are few, else integer ticks; one checkpoint gets room
    on both sides instead of a fractional scale."""
    from matplotlib.ticker import MaxNLocator

    distinct = sorted(set(steps))
    if len(distinct) == 1:
        ax.set_xlim(distinct[0] - 1, distinct[0] + 1)
    if distinct and len(distinct) <= 12:
        ax.set_xticks(distinct)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("global step")


def plot_rouge(points: list[dict], best: dict | None, num_examples: int, path: str | Path) -> Path:
    plt = _pyplot()

    path = Path(path)
    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for metric in ROUGE_TYPES:
        (line,) = ax.plot(steps, [p[metric] for p in points], label=LABELS[metric], **METRIC_STYLES[metric])
        if all(p[f"{metric}_low"] is not None for p in points):
            ax.fill_between(steps, [p[f"{metric}_low"] for p in points], [p[f"{metric}_high"] for p in points],
                            color=line.get_color(), alpha=0.12, linewidth=0)
    if best:
        ax.plot([best["global_step"]], [best["rougeLsum"]], marker="*", markersize=16, color="black",
                linestyle="none", label=f"best ROUGE-Lsum: {best['checkpoint']}")
    if points and points[0]["checkpoint"] == BASE_MODEL:  # step 0: the model before training
        ax.annotate("base model", (0, points[0]["rougeLsum"]), textcoords="offset points", xytext=(4, 8), fontsize=8)
    _step_axis(ax, steps)
    ax.set_ylabel("F-measure")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"ROUGE by checkpoint ({num_examples} validation examples; bands: 95% bootstrap interval)")
    return _save(fig, ax, path)


def plot_loss(points: list[dict], path: str | Path, checkpoint_steps: list[int] = (),
              best_step: int | None = None) -> Path:
    """Train and eval loss against global step (`points`: loss_points); the checkpoints as triangles on the step
    axis, not as lines that look like the grid."""
    plt = _pyplot()

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for key, style in (("train_loss", dict(marker=".", markersize=4, label="train loss", linewidth=1.2)),
                       ("eval_loss", dict(marker="o", markersize=5, label="eval loss", linewidth=1.5))):
        logged = [(p["step"], p[key]) for p in points if p[key] is not None]
        if logged:
            ax.plot(*zip(*logged), **style)
    saved = sorted(set(checkpoint_steps))
    if saved:  # y in axes coordinates: just above the step axis, whatever the losses' range
        ax.plot(saved, [0.02] * len(saved), marker="^", markersize=8, linestyle="none", color="tab:green",
                transform=ax.get_xaxis_transform(), clip_on=False, label="checkpoint")
    if best_step is not None:
        ax.axvline(best_step, color="black", linestyle="--", linewidth=1, label=f"best ROUGE-Lsum (step {best_step})")
    _step_axis(ax, [p["step"] for p in points] + saved)
    ax.set_ylabel("loss (summary tokens)")
    ax.grid(alpha=0.3)
    ax.set_title("Loss from trainer_state.json")
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    """Every plot's end: its legend, the layout, the PNG written atomically (a reader never sees half of one), the
    figure closed."""
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return path


def link_best(run_dir: str | Path, row: dict | None) -> Path | None:
    """RUN_DIR/best_checkpoint -> the best checkpoint (relative when inside the run, so the run can move)."""
    run_dir = Path(run_dir)
    link = run_dir / BEST_LINK
    if row is None:
        return None
    target = run_dir / row["checkpoint"]
    if not target.is_dir() and row.get("checkpoint_path"):  # scored with --checkpoint from elsewhere
        target = Path(row["checkpoint_path"])
    if not target.is_dir():  # deleted since it was scored: no link to nowhere
        return None
    rel = os.path.relpath(target.resolve(), run_dir.resolve())
    if rel.startswith(".."):  # outside the run: absolute
        rel = str(target.resolve())
    with atomic_path(link, durable=False) as tmp:  # renamed over the old link: it always points somewhere valid
        tmp.unlink(missing_ok=True)  # left by a run killed here
        os.symlink(rel, tmp)
    return link


def length_points(findings: Findings) -> list[dict]:
    """What rouge_by_length.png plots: per bucket (its label, the bounds of its rule, the prompt tokens seen in it,
    n) and shown row (base, best, final_adapter), the mean ROUGE-Lsum and its interval (None without one)."""
    points = []
    for row, intervals in findings.by_length:
        for bucket, interval in zip(findings.buckets, intervals):
            seen = [findings.prompt_tokens[i] for i in bucket.indices]
            points.append({"bucket": bucket.label, "prompt_tokens_above": bucket.low,
                           "prompt_tokens_up_to": bucket.high, "prompt_tokens_min": min(seen), "prompt_tokens_max": max(seen), "n": interval.n,
                           "checkpoint": row["checkpoint"], "global_step": row["global_step"],
                           "rougeLsum": interval.mean, "rougeLsum_low": interval.low,
                           "rougeLsum_high": interval.high})
    return points


LENGTH_STYLES = {BASE_MODEL: dict(marker="s", color="tab:gray"), "best": dict(marker="o", color="tab:blue"),
                 FINAL_ADAPTER: dict(marker="D", color="tab:orange", fillstyle="none")}


def plot_length(points: list[dict], best: dict | None, path: str | Path) -> Path:
    """ROUGE-Lsum by prompt-length bucket (`points`: length_points), one series per shown row with its interval as
    error bars, side by side within each bucket."""
    plt = _pyplot()

    path = Path(path)
    buckets = list(dict.fromkeys(p["bucket"] for p in points))
    names = list(dict.fromkeys(p["checkpoint"] for p in points))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    width = 0.6 / max(len(names), 1)
    for k, name in enumerate(names):
        mine = [p for p in points if p["checkpoint"] == name]
        x = [buckets.index(p["bucket"]) + (k - (len(names) - 1) / 2) * width for p in mine]
        y = [p["rougeLsum"] for p in mine]
        below = [p["rougeLsum"] - p["rougeLsum_low"] if p["rougeLsum_low"] is not None else 0 for p in mine]
        above = [p["rougeLsum_high"] - p["rougeLsum"] if p["rougeLsum_high"] is not None else 0 for p in mine]
        is_best = best is not None and name == best["checkpoint"]
        style = LENGTH_STYLES["best" if is_best else name] if is_best or name in LENGTH_STYLES else {}
        ax.errorbar(x, y, yerr=[below, above], linestyle="none", capsize=4, markersize=7,
                    label=f"{name} (best)" if is_best else ("base model" if name == BASE_MODEL else name), **style)
    first = {p["bucket"]: p for p in reversed(points)}
    ax.set_xticks(range(len(buckets)))
    ax.set_xticklabels([f"{b}\n(n={first[b]['n']}; seen {first[b]['prompt_tokens_min']:,}-"
                        f"{first[b]['prompt_tokens_max']:,})" for b in buckets], fontsize=8)
    ax.set_xlim(-0.6, len(buckets) - 0.4)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ROUGE-Lsum (F-measure)")
    ax.set_ylim(-0.03, 1)  # a model that scores 0 (an untrained base) stays visible
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("ROUGE-Lsum by prompt length (error bars: 95% bootstrap interval)")
    return _save(fig, ax, path)


def write_report(run_dir: str | Path, rows: list[dict], findings: Findings | None = None) -> dict[str, Path]:
    """eval_summary.md, the plots with their data as CSV, and the best_checkpoint link for these rows. `findings`:
    analyse's (computed here with the default buckets when not given)."""
    run_dir = Path(run_dir)
    state = latest_trainer_state(run_dir)
    best = best_row(rows)
    findings = findings if findings is not None else analyse(run_dir, rows)
    out = {"summary": write_atomic(run_dir / SUMMARY_FILE, summary_markdown(rows, state, run_dir, findings))}
    if rows:
        points = rouge_points(rows)
        out["rouge_plot"] = plot_rouge(points, best, by_step(rows)[0]["num_examples"], run_dir / ROUGE_PLOT)
        out["rouge_data"] = write_csv(run_dir / ROUGE_CSV, points)
    by_length = length_points(findings)
    if by_length:
        out["length_plot"] = plot_length(by_length, best, run_dir / LENGTH_PLOT)
        out["length_data"] = write_csv(run_dir / LENGTH_CSV, by_length)
    losses = loss_points(state)
    if losses:  # nothing logged (no trainer_state.json): no loss plot
        out["loss_plot"] = plot_loss(losses, run_dir / LOSS_PLOT,
                                     [r["global_step"] for r in rows if r["checkpoint"] != BASE_MODEL
                                      and not is_average(r)],
                                     best["global_step"] if best else None)
        out["loss_data"] = write_csv(run_dir / LOSS_CSV, losses)
    link = link_best(run_dir, best)
    if link:
        out["best_link"] = link
    return out


def format_table(rows: list[dict]) -> str:
    """Results by step as printed at the end of an evaluation, the best ROUGE-Lsum marked with '*'."""
    if not rows:
        return "no results"
    rows = by_step(rows)
    best = best_row(rows)
    width = max(24, *(len(r["checkpoint"]) + 2 for r in rows))  # an average's name can be longer
    lines = [f"{'checkpoint':<{width}}{'step':>8}" + "".join(f"{m:>11}" for m in ROUGE_TYPES)
             + f"{'Lsum 95% CI':>18}{'tokens pred/ref':>17}{'empty':>7}{'n':>6}"]
    for r in rows:
        ci = f"[{r['rougeLsum_low']:.3f}, {r['rougeLsum_high']:.3f}]" if "rougeLsum_low" in r else ""
        lines.append(f"{r['checkpoint']:<{width}}{r['global_step']:>8}" + "".join(f"{r[m]:>11.4f}" for m in ROUGE_TYPES)
                     + f"{ci:>18}{_tokens_cell(r):>17}{r.get('num_empty', ''):>7}{r['num_examples']:>6}"
                     + (" *" if r is best else ""))
    lines.append(f"* best by rougeLsum: {best['checkpoint']} (step {best['global_step']})" if best else
                 "* no trained checkpoint scored yet")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Redraw the evaluation report of a run from eval_results.jsonl "
                                                 "(the settings of its newest row).")
    parser.add_argument("run_dir")
    parser.add_argument("--length_buckets", type=int, nargs="+", default=None,
                        help="prompt-token edges of the length table (default: quantiles)")
    parser.add_argument("--length_bucket_min_examples", type=int, default=5,
                        help="fewest examples in a length bucket (default 5)")
    args = parser.parse_args(argv)
    results = Path(args.run_dir) / RESULTS_FILE
    rows = read_results(results, warn=lambda message: print(message, file=sys.stderr))
    if not rows:
        found = "holds no results row" if results.is_file() else "not found"
        print(f"error: {results}: {found}; score the run first (eval_all_checkpoints.sh).", file=sys.stderr)
        sys.exit(2)
    problem = analysis.length_settings_problem(args.length_buckets, args.length_bucket_min_examples)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    rows = select_rows(rows, rows[-1].get("eval_fingerprint"))
    findings = analyse(args.run_dir, rows, args.length_buckets, args.length_bucket_min_examples)
    for name, path in write_report(args.run_dir, rows, findings).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
