"""The progression of a run at a glance: summary table, ROUGE by step, loss curve, link to the best checkpoint.

    python -m longctx.report runs/000_tiny_smoke     # redraw; eval_all_checkpoints.sh does this after scoring

Writes into the run directory:
  eval_summary.md     table by step (ROUGE with 95% bootstrap intervals, eval loss, empty predictions), the best
                      checkpoint by ROUGE-Lsum and by eval loss, the generation settings
  rouge_by_step.png   ROUGE-1/2/L/Lsum against global step, interval bands, best ROUGE-Lsum starred
  loss_curve.png      train and eval loss from trainer_state.json, checkpoint steps and the best one marked
  best_checkpoint     symbolic link (relative) to the best checkpoint by ROUGE-Lsum

Everything here reads results rows and trainer_state.json; nothing loads a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import checkpoints
from .metrics import ROUGE_TYPES

SUMMARY_FILE = "eval_summary.md"
ROUGE_PLOT = "rouge_by_step.png"
LOSS_PLOT = "loss_curve.png"
BEST_LINK = "best_checkpoint"
LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


def by_step(rows: list[dict]) -> list[dict]:
    """Rows in step order; at equal steps checkpoint-N before final_adapter (they hold the same weights)."""
    return sorted(rows, key=lambda r: (r["global_step"], r["checkpoint"] == "final_adapter", r["checkpoint"]))


def best_row(rows: list[dict], metric: str = "rougeLsum") -> dict | None:
    """Highest `metric`; ties go to the earliest step."""
    rows = [r for r in by_step(rows) if r.get(metric) is not None]
    return max(rows, key=lambda r: r[metric]) if rows else None


def latest_trainer_state(run_dir: str | Path) -> dict:
    """trainer_state.json of the latest checkpoint: its log_history holds every loss logged up to it."""
    run_dir = Path(run_dir)
    steps = []
    for path in run_dir.glob("checkpoint-*"):
        match = checkpoints.CHECKPOINT_RE.match(path.name)
        if match and (path / checkpoints.TRAINER_STATE).is_file():
            steps.append((int(match.group(1)), path))
    for _, path in sorted(steps, reverse=True):
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
        lines.append("- ROUGE: rouge_score, stemmed, F-measure as fractions; [low, high] is the 95% bootstrap "
                     "interval. Empty predictions score 0.")
        lines.append("")
    if best:
        lines.append(f"**Best by ROUGE-Lsum:** {best['checkpoint']} (step {best['global_step']}): "
                     f"ROUGE-Lsum {_cell(best, 'rougeLsum')}.  ")
    if best_loss:
        lines.append(f"**Best by eval loss:** {best_loss['checkpoint']} (step {best_loss['global_step']}): "
                     f"eval loss {losses[best_loss['global_step']]:.4f}.")
    elif rows:
        lines.append("**Best by eval loss:** no eval loss in trainer_state.json at the scored steps.")
    lines += ["", "| checkpoint | step | " + " | ".join(LABELS[m] for m in ROUGE_TYPES) + " | eval loss | empty | n |",
              "|---|---:|" + "---:|" * len(ROUGE_TYPES) + "---:|---:|---:|"]
    for r in rows:
        name = f"**{r['checkpoint']}**" if r is best else r["checkpoint"]
        loss = losses.get(r["global_step"])
        lines.append(f"| {name} | {r['global_step']} | " + " | ".join(_cell(r, m) for m in ROUGE_TYPES)
                     + f" | {'' if loss is None else f'{loss:.4f}'} | {r.get('num_empty', '')} "
                       f"| {r['num_examples']} |")
    if not rows:
        lines.append("| (no checkpoint scored yet) |" + " |" * (len(ROUGE_TYPES) + 4))
    lines += ["", f"![ROUGE by step]({ROUGE_PLOT})", "", f"![Loss]({LOSS_PLOT})", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on clusters or CI
    import matplotlib.pyplot as plt

    return plt


def _plotted(rows: list[dict]) -> list[dict]:
    """One point per step: final_adapter only where no checkpoint-N has its step."""
    seen, out = set(), []
    for r in by_step(rows):
        if r["global_step"] not in seen:
            seen.add(r["global_step"])
            out.append(r)
    return out


def plot_rouge(rows: list[dict], path: str | Path) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    points = _plotted(rows)
    steps = [r["global_step"] for r in points]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for metric in ROUGE_TYPES:
        values = [r[metric] for r in points]
        (line,) = ax.plot(steps, values, marker="o", markersize=4, label=LABELS[metric])
        if all(r.get(f"{metric}_low") is not None for r in points):
            ax.fill_between(steps, [r[f"{metric}_low"] for r in points], [r[f"{metric}_high"] for r in points],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    best = best_row(rows)
    if best:
        ax.plot([best["global_step"]], [best["rougeLsum"]], marker="*", markersize=16, color="black",
                linestyle="none", label=f"best ROUGE-Lsum: {best['checkpoint']}")
    ax.set_xlabel("global step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("F-measure")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    n = points[0]["num_examples"] if points else 0
    ax.set_title(f"ROUGE by checkpoint ({n} validation examples; bands: 95% bootstrap interval)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_loss(trainer_state: dict, path: str | Path, checkpoint_steps: list[int] = (),
              best_step: int | None = None) -> Path | None:
    """Train and eval loss against global step; None (nothing written) when no loss was logged."""
    train, evals = train_losses(trainer_state), sorted(eval_losses(trainer_state).items())
    if not train and not evals:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot(*zip(*train), marker=".", markersize=4, label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), marker="o", markersize=5, label="eval loss", linewidth=1.5)
    for step in sorted(set(checkpoint_steps)):
        ax.axvline(step, color="grey", alpha=0.25, linewidth=0.8)
    if best_step is not None:
        ax.axvline(best_step, color="black", linestyle="--", linewidth=1, label=f"best ROUGE-Lsum (step {best_step})")
    ax.set_xlabel("global step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (summary tokens)")
    ax.grid(alpha=0.3)
    ax.set_title("Loss from trainer_state.json (grey: checkpoints)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: Path) -> None:
    """Write beside, then rename: a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


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
    tmp = run_dir / f".{BEST_LINK}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(rel, tmp)
    os.replace(tmp, link)  # atomic: the link always points somewhere valid
    return link


def write_report(run_dir: str | Path, rows: list[dict]) -> dict[str, Path]:
    """eval_summary.md, rouge_by_step.png, loss_curve.png and the best_checkpoint link for these rows."""
    run_dir = Path(run_dir)
    state = latest_trainer_state(run_dir)
    best = best_row(rows)
    summary = run_dir / SUMMARY_FILE
    tmp = summary.with_name(f".{SUMMARY_FILE}.tmp")
    tmp.write_text(summary_markdown(rows, state, run_dir), encoding="utf-8")
    os.replace(tmp, summary)
    out = {"summary": summary}
    if rows:
        out["rouge_plot"] = plot_rouge(rows, run_dir / ROUGE_PLOT)
    loss = plot_loss(state, run_dir / LOSS_PLOT, [r["global_step"] for r in rows],
                     best["global_step"] if best else None)
    if loss:
        out["loss_plot"] = loss
    link = link_best(run_dir, best)
    if link:
        out["best_link"] = link
    return out


def select_rows(rows: list[dict], fingerprint: str | None) -> list[dict]:
    """The rows scored with one set of evaluation settings (`eval_fingerprint`), the last one per checkpoint."""
    latest: dict[str, dict] = {}
    for row in rows:
        if row.get("eval_fingerprint") == fingerprint:
            latest[row["checkpoint"]] = row
    return list(latest.values())


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Redraw the evaluation report of a run from eval_results.jsonl "
                                                 "(the settings of its newest row).")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    results = Path(args.run_dir) / "eval_results.jsonl"
    if not results.is_file():
        print(f"error: {results}: not found; score the run first (eval_all_checkpoints.sh).", file=sys.stderr)
        sys.exit(2)
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
    for name, path in write_report(args.run_dir, select_rows(rows, rows[-1].get("eval_fingerprint"))).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
