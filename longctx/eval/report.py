"""The progression of a run at a glance: summary table, ROUGE by step, loss curve, link to the best checkpoint.

    python -m longctx.eval.report runs/000_tiny_smoke     # redraw; eval_all_checkpoints.sh does this after scoring

Writes into the run directory:
  eval_summary.md     table by step (ROUGE with 95% bootstrap intervals, eval loss; predictions empty, with a
                      reasoning block removed, stopped by max_new_tokens), the best checkpoint by ROUGE-Lsum and by
                      eval loss, the generation settings, the references longer than max_new_tokens
  rouge_by_step.png   ROUGE-1/2/L/Lsum against global step, interval bands, best ROUGE-Lsum starred
  rouge_by_step.csv   the plotted points: step, checkpoint, each metric with its interval (_low, _high)
  loss_curve.png      train and eval loss from trainer_state.json, checkpoint steps and the best one marked
  loss_curve.csv      the plotted points: step, train_loss, eval_loss (empty where not logged at that step)
  best_checkpoint     symbolic link (relative) to the best checkpoint by ROUGE-Lsum

Everything here reads results rows and trainer_state.json; nothing loads a model.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

from ..run import checkpoints
from ..run.layout import (
    BEST_LINK,
    FINAL_ADAPTER,
    LOSS_CSV,
    LOSS_PLOT,
    RESULTS_FILE,
    ROUGE_CSV,
    ROUGE_PLOT,
    SUMMARY_FILE,
    TRAINER_STATE,
)
from ..utils.atomic_write import atomic_path, write_atomic
from .metrics import ROUGE_TYPES
from .results import read_results, select_rows

LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


def by_step(rows: list[dict]) -> list[dict]:
    """Rows in step order; at equal steps checkpoint-N before final_adapter (they hold the same weights)."""
    return sorted(rows, key=lambda r: (r["global_step"], r["checkpoint"] == FINAL_ADAPTER,
                                       r["checkpoint"]))


def best_row(rows: list[dict], metric: str = "rougeLsum") -> dict | None:
    """Highest `metric`; ties go to the earliest step."""
    rows = [r for r in by_step(rows) if r.get(metric) is not None]
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


def summary_markdown(rows: list[dict], trainer_state: dict, run_dir: str | Path = ".") -> str:
    rows = by_step(rows)
    losses = eval_losses(trainer_state)
    best = best_row(rows)
    with_loss = [r for r in rows if r["global_step"] in losses]
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
        lines.append("")
    if best:
        lines.append(f"**Best by ROUGE-Lsum:** {best['checkpoint']} (step {best['global_step']}): "
                     f"ROUGE-Lsum {_cell(best, 'rougeLsum')}.  ")
    if best_loss:
        lines.append(f"**Best by eval loss:** {best_loss['checkpoint']} (step {best_loss['global_step']}): "
                     f"eval loss {losses[best_loss['global_step']]:.4f}.")
    elif rows:
        lines.append("**Best by eval loss:** no eval loss in trainer_state.json at the scored steps.")
    counts = ("num_empty", "num_think_stripped", "num_hit_max_new_tokens")
    lines += ["", "| checkpoint | step | " + " | ".join(LABELS[m] for m in ROUGE_TYPES)
              + " | eval loss | empty | think | max | n |",
              "|---|---:|" + "---:|" * len(ROUGE_TYPES) + "---:|" * (len(counts) + 2)]
    for r in rows:
        name = f"**{r['checkpoint']}**" if r is best else r["checkpoint"]
        loss = losses.get(r["global_step"])
        lines.append(f"| {name} | {r['global_step']} | " + " | ".join(_cell(r, m) for m in ROUGE_TYPES)
                     + f" | {'' if loss is None else f'{loss:.4f}'} | "
                     + " | ".join(str(r.get(c, "")) for c in counts) + f" | {r['num_examples']} |")
    if not rows:
        lines.append("| (no checkpoint scored yet) |" + " |" * (len(ROUGE_TYPES) + len(counts) + 3))
    lines += ["", f"![ROUGE by step]({ROUGE_PLOT})", "", f"![Loss]({LOSS_PLOT})", ""]
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
        if r["global_step"] in seen:
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
    _step_axis(ax, steps)
    ax.set_ylabel("F-measure")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"ROUGE by checkpoint ({num_examples} validation examples; bands: 95% bootstrap interval)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


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
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, format="png")


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


def write_report(run_dir: str | Path, rows: list[dict]) -> dict[str, Path]:
    """eval_summary.md, the two plots with their data as CSV, and the best_checkpoint link for these rows."""
    run_dir = Path(run_dir)
    state = latest_trainer_state(run_dir)
    best = best_row(rows)
    out = {"summary": write_atomic(run_dir / SUMMARY_FILE, summary_markdown(rows, state, run_dir))}
    if rows:
        points = rouge_points(rows)
        out["rouge_plot"] = plot_rouge(points, best, by_step(rows)[0]["num_examples"], run_dir / ROUGE_PLOT)
        out["rouge_data"] = write_csv(run_dir / ROUGE_CSV, points)
    losses = loss_points(state)
    if losses:  # nothing logged (no trainer_state.json): no loss plot
        out["loss_plot"] = plot_loss(losses, run_dir / LOSS_PLOT, [r["global_step"] for r in rows],
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
    lines = [f"{'checkpoint':<24}{'step':>8}" + "".join(f"{m:>11}" for m in ROUGE_TYPES)
             + f"{'Lsum 95% CI':>18}{'empty':>7}{'n':>6}"]
    for r in rows:
        ci = f"[{r['rougeLsum_low']:.3f}, {r['rougeLsum_high']:.3f}]" if "rougeLsum_low" in r else ""
        lines.append(f"{r['checkpoint']:<24}{r['global_step']:>8}" + "".join(f"{r[m]:>11.4f}" for m in ROUGE_TYPES)
                     + f"{ci:>18}{r.get('num_empty', ''):>7}{r['num_examples']:>6}" + (" *" if r is best else ""))
    lines.append(f"* best by rougeLsum: {best['checkpoint']} (step {best['global_step']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Redraw the evaluation report of a run from eval_results.jsonl "
                                                 "(the settings of its newest row).")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    results = Path(args.run_dir) / RESULTS_FILE
    rows = read_results(results, warn=lambda message: print(message, file=sys.stderr))
    if not rows:
        found = "holds no results row" if results.is_file() else "not found"
        print(f"error: {results}: {found}; score the run first (eval_all_checkpoints.sh).", file=sys.stderr)
        sys.exit(2)
    for name, path in write_report(args.run_dir, select_rows(rows, rows[-1].get("eval_fingerprint"))).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
