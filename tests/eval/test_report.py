"""longctx.eval.report: summary table (the base model first), best checkpoint by ROUGE-Lsum (never the base) and by
eval loss, the paired differences and ROUGE-Lsum by prompt length from hand-made predictions files, the plots and
their data as CSV, the printed table, the best link, the command line.

Hand-made rows, predictions files and trainer_state.json: no model, no training.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from longctx.eval import report


def row(name: str, step: int, lsum: float, fp: str = "fp", **extra) -> dict:
    r = {"checkpoint": name, "global_step": step, "num_examples": 12, "num_empty": 0, "eval_fingerprint": fp}
    for i, metric in enumerate(("rouge1", "rouge2", "rougeL", "rougeLsum")):
        mid = lsum + 0.05 * (1 - i) if metric != "rougeLsum" else lsum
        r.update({metric: mid, f"{metric}_low": mid - 0.04, f"{metric}_high": mid + 0.03})
    r.update(extra)
    return r


COUNTS = {"num_think_stripped": 0, "num_hit_max_new_tokens": 1, "num_references_over_max_new_tokens": 3,
          "reference_tokens_p95": 900, "generation": {"max_new_tokens": 512, "decoding": "greedy"},
          "mean_prediction_tokens": 20.5, "mean_reference_tokens": 25.0}
ROWS = [row("checkpoint-100", 100, 0.30, num_empty=2, **{**COUNTS, "num_hit_max_new_tokens": 5}),
        row("checkpoint-200", 200, 0.52, **COUNTS), row("checkpoint-300", 300, 0.47, **COUNTS),
        row("final_adapter", 300, 0.47, **{**COUNTS, "num_think_stripped": 2})]
STATE = {"log_history": [
    {"step": 10, "loss": 3.1}, {"step": 100, "loss": 2.2}, {"step": 100, "eval_loss": 2.4},
    {"step": 200, "loss": 1.7}, {"step": 200, "eval_loss": 2.0}, {"step": 300, "loss": 1.2},
    {"step": 300, "eval_loss": 1.9}, {"step": 300, "train_runtime": 55.0},
]}


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    for name in ("checkpoint-100", "checkpoint-200", "checkpoint-300", "final_adapter"):
        (tmp_path / name).mkdir()
    # Only the latest checkpoint's state holds the whole history; an older one must not be picked.
    (tmp_path / "checkpoint-300" / "trainer_state.json").write_text(json.dumps(STATE))
    early = {"log_history": STATE["log_history"][:3]}
    (tmp_path / "checkpoint-100" / "trainer_state.json").write_text(json.dumps(early))
    return tmp_path


def test_best_by_rouge_lsum_and_by_eval_loss_can_differ():
    assert report.best_row(ROWS)["checkpoint"] == "checkpoint-200"
    assert report.eval_losses(STATE) == {100: 2.4, 200: 2.0, 300: 1.9}
    md = report.summary_markdown(ROWS, STATE, "run1")
    assert "**Best by ROUGE-Lsum:** checkpoint-200 (step 200): ROUGE-Lsum 0.5200 [0.480, 0.550]." in md
    assert "**Best by eval loss:** checkpoint-300 (step 300): eval loss 1.9000." in md  # not final_adapter: tie


def test_ties_go_to_the_earliest_step_and_checkpoint_before_final_adapter():
    rows = [row("final_adapter", 300, 0.5), row("checkpoint-300", 300, 0.5), row("checkpoint-200", 200, 0.5)]
    assert report.best_row(rows)["checkpoint"] == "checkpoint-200"
    assert [r["checkpoint"] for r in report.by_step(rows)] == ["checkpoint-200", "checkpoint-300", "final_adapter"]


def test_summary_table_by_step_with_intervals_eval_loss_and_prediction_counts():
    md = report.summary_markdown(list(reversed(ROWS)), STATE, "run1")
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| checkpoint | step | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | eval loss | tokens | empty "
                        "| think | max | n |")
    assert lines[1] == ("| checkpoint-100 | 100 | 0.3500 [0.310, 0.380] | 0.3000 [0.260, 0.330] "
                        "| 0.2500 [0.210, 0.280] | 0.3000 [0.260, 0.330] | 2.4000 | 20.5 / 25.0 | 2 | 0 | 5 | 12 |")
    assert lines[2].startswith("| **checkpoint-200** | 200 |")  # the best, in bold
    assert [line.split("|")[1].strip() for line in lines[3:]] == ["checkpoint-300", "final_adapter"]
    assert lines[4].endswith("| 1.9000 | 20.5 / 25.0 | 0 | 2 | 1 | 12 |")  # final_adapter: 2 think blocks stripped
    assert ("- References longer than max_new_tokens=512 tokens (summary + end of turn): 3 of 12; "
            "max_new_tokens=900 would cover 95% of them.") in md.splitlines()
    assert "![ROUGE by step](rouge_by_step.png)" in md and "![Loss](loss_curve.png)" in md


def test_write_report_makes_summary_plots_and_relative_best_link(run_dir):
    import matplotlib.image

    paths = report.write_report(run_dir, ROWS)
    assert paths["summary"].read_text().startswith(f"# Evaluation of {run_dir.name}")
    assert "eval loss 1.9000" in paths["summary"].read_text()  # from checkpoint-300's state, the latest
    for key in ("rouge_plot", "loss_plot"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        height, width, _ = matplotlib.image.imread(paths[key]).shape
        assert (width, height) == (880, 495)
    link = run_dir / "best_checkpoint"
    assert link.is_symlink() and str(link.readlink()) == "checkpoint-200"  # relative: the run can be moved
    assert link.resolve() == (run_dir / "checkpoint-200").resolve()
    assert not list(run_dir.glob(".*.tmp"))

    better = ROWS + [row("checkpoint-400", 400, 0.61)]
    (run_dir / "checkpoint-400").mkdir()
    report.write_report(run_dir, better)
    assert str(link.readlink()) == "checkpoint-400"  # replaced in place


def test_without_trainer_state_the_loss_plot_is_left_out(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    paths = report.write_report(tmp_path, [row("checkpoint-1", 1, 0.2)])
    assert "loss_plot" not in paths and not (tmp_path / "loss_curve.png").exists()
    assert "no eval loss in trainer_state.json" in paths["summary"].read_text()
    assert (tmp_path / "rouge_by_step.png").is_file()


def test_rows_without_intervals_still_plot_and_tabulate(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    legacy = {"checkpoint": "checkpoint-1", "global_step": 1, "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2,
              "rougeLsum": 0.25, "num_examples": 4}
    paths = report.write_report(tmp_path, [legacy])
    assert "| **checkpoint-1** | 1 | 0.3000 | 0.1000 | 0.2000 | 0.2500 |" in paths["summary"].read_text()
    assert paths["rouge_plot"].is_file()


def test_final_adapter_at_a_checkpoint_step_is_plotted_once():
    plotted = [p["checkpoint"] for p in report.rouge_points(ROWS)]
    assert plotted == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    alone = [row("checkpoint-100", 100, 0.3), row("final_adapter", 150, 0.4)]
    assert [p["checkpoint"] for p in report.rouge_points(alone)] == ["checkpoint-100", "final_adapter"]


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_each_plot_has_its_plotted_data_beside_it_as_csv(run_dir, monkeypatch):
    drawn = {}  # file name -> {line label: (x, y)} as matplotlib holds them when the figure is saved
    real_save = report._save

    def save_and_keep_lines(fig, ax, path):
        drawn[path.name] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                            for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
        return real_save(fig, ax, path)

    monkeypatch.setattr(report, "_save", save_and_keep_lines)
    paths = report.write_report(run_dir, ROWS)
    assert paths["rouge_data"] == run_dir / "rouge_by_step.csv" and paths["loss_data"] == run_dir / "loss_curve.csv"

    # By hand from row(): rouge1 = Lsum + 0.05, rouge2 = Lsum, rougeL = Lsum - 0.05; each interval is [-0.04, +0.03]
    # around its value. final_adapter shares step 300 with checkpoint-300 and is not a point of its own.
    rouge = read_csv(run_dir / "rouge_by_step.csv")
    assert list(rouge[0]) == ["step", "checkpoint", "rouge1", "rouge1_low", "rouge1_high", "rouge2", "rouge2_low",
                              "rouge2_high", "rougeL", "rougeL_low", "rougeL_high", "rougeLsum", "rougeLsum_low",
                              "rougeLsum_high"]
    assert [(r["step"], r["checkpoint"]) for r in rouge] == [("100", "checkpoint-100"), ("200", "checkpoint-200"),
                                                             ("300", "checkpoint-300")]
    expected = {"checkpoint-100": [0.35, 0.31, 0.38, 0.30, 0.26, 0.33, 0.25, 0.21, 0.28, 0.30, 0.26, 0.33],
                "checkpoint-200": [0.57, 0.53, 0.60, 0.52, 0.48, 0.55, 0.47, 0.43, 0.50, 0.52, 0.48, 0.55],
                "checkpoint-300": [0.52, 0.48, 0.55, 0.47, 0.43, 0.50, 0.42, 0.38, 0.45, 0.47, 0.43, 0.50]}
    for r in rouge:
        assert [float(r[k]) for k in list(r)[2:]] == pytest.approx(expected[r["checkpoint"]], abs=1e-12)
    lines = drawn["rouge_by_step.png"]
    for label, metric in report.LABELS.items():
        assert lines[metric] == ([100, 200, 300], [float(r[label]) for r in rouge])  # the figure plots the CSV
    assert lines["best ROUGE-Lsum: checkpoint-200"] == ([200], [0.52])

    # By hand from STATE (checkpoint-300's, the latest): train loss at 10, 100, 200, 300; eval loss from 100 on.
    loss = read_csv(run_dir / "loss_curve.csv")
    assert [tuple(r.values()) for r in loss] == [("10", "3.1", ""), ("100", "2.2", "2.4"), ("200", "1.7", "2.0"),
                                                 ("300", "1.2", "1.9")]
    lines = drawn["loss_curve.png"]
    assert lines["train loss"] == ([10, 100, 200, 300], [3.1, 2.2, 1.7, 1.2])
    assert lines["eval loss"] == ([100, 200, 300], [2.4, 2.0, 1.9])
    assert lines["best ROUGE-Lsum (step 200)"][0] == [200, 200]  # the dashed line at the best step
    assert not list(run_dir.glob(".*.tmp"))


def test_printed_table_is_by_step_with_the_best_marked():
    table = report.format_table(list(reversed(ROWS))).splitlines()
    assert table[0].split() == ["checkpoint", "step", "rouge1", "rouge2", "rougeL", "rougeLsum", "Lsum", "95%", "CI",
                                "tokens", "pred/ref", "empty", "n"]
    # checkpoint-200: rouge1 0.52 + 0.05, rouge2 0.52, rougeL 0.52 - 0.05, Lsum 0.52 in [0.48, 0.55]; 20.5 tokens
    # predicted for 25 in the reference on average; 0 empty of 12
    assert table[2].split() == ["checkpoint-200", "200", "0.5700", "0.5200", "0.4700", "0.5200", "[0.480,", "0.550]",
                                "20.5", "/", "25.0", "0", "12", "*"]
    assert [line.split()[0] for line in table[1:5]] == ["checkpoint-100", "checkpoint-200", "checkpoint-300",
                                                        "final_adapter"]
    assert sum(line.endswith(" *") for line in table) == 1
    assert table[-1] == "* best by rougeLsum: checkpoint-200 (step 200)"
    assert report.format_table([]) == "no results"


def test_command_line_redraws_from_eval_results(run_dir, capsys):
    (run_dir / "eval_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    report.main([str(run_dir)])
    assert f"summary: {run_dir / 'eval_summary.md'}" in capsys.readouterr().out
    assert (run_dir / "best_checkpoint").readlink() == Path("checkpoint-200")
    with pytest.raises(SystemExit) as exit_:
        report.main([str(run_dir / "nowhere")])
    assert exit_.value.code == 2
    assert f"error: {run_dir / 'nowhere' / 'eval_results.jsonl'}: not found; score the run first " \
           "(eval_all_checkpoints.sh)." in capsys.readouterr().err


def test_command_line_reports_a_line_that_is_not_a_row_and_refuses_an_empty_file(run_dir, capsys):
    results = run_dir / "eval_results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]) + '{"checkp\n')
    report.main([str(run_dir)])
    captured = capsys.readouterr()
    assert f"{results}: line 3 is not a results row" in captured.err
    assert (run_dir / "best_checkpoint").readlink() == Path("checkpoint-200")
    results.write_text("\n")
    with pytest.raises(SystemExit) as exit_:
        report.main([str(run_dir)])
    assert exit_.value.code == 2
    assert f"error: {results}: holds no results row; score the run first" in capsys.readouterr().err


def test_plots_keep_coinciding_metrics_apart_and_show_whole_steps(tmp_path, monkeypatch):
    """One checkpoint whose ROUGE-L equals its ROUGE-Lsum (common for one-sentence summaries): each metric has its
    own marker and line style, ROUGE-L's hollow marker is larger than ROUGE-Lsum's, the step ticks are whole
    numbers, and the loss plot marks checkpoints with labelled triangles, not grey lines like the grid."""
    figures = {}
    real_save = report._save

    def save_and_keep(fig, ax, path):
        ax = fig.axes[0]
        figures[path.name] = {"lines": {line.get_label(): line for line in ax.get_lines()},
                              "xticks": list(ax.get_xticks()), "xlim": ax.get_xlim()}
        return real_save(fig, ax, path)

    monkeypatch.setattr(report, "_save", save_and_keep)
    (tmp_path / "checkpoint-7").mkdir()
    equal = row("checkpoint-7", 7, 0.5)
    equal.update(rougeL=0.5, rougeL_low=0.46, rougeL_high=0.53)  # the same as ROUGE-Lsum
    state = {"log_history": [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 8)] + [{"step": 7, "eval_loss": 2.5}]}
    (tmp_path / "checkpoint-7" / "trainer_state.json").write_text(json.dumps(state))
    report.write_report(tmp_path, [equal])

    rouge = figures["rouge_by_step.png"]
    styles = {m: (rouge["lines"][label].get_marker(), rouge["lines"][label].get_linestyle())
              for m, label in report.LABELS.items()}
    assert len(set(styles.values())) == 4, styles
    lsum, rouge_l = rouge["lines"]["ROUGE-Lsum"], rouge["lines"]["ROUGE-L"]
    assert list(rouge_l.get_ydata()) == list(lsum.get_ydata()) == [0.5]
    assert rouge_l.get_fillstyle() == "none" and rouge_l.get_markersize() > lsum.get_markersize()
    assert rouge["xticks"] == [7] and rouge["xlim"] == (6, 8)  # no fractional steps around one checkpoint

    loss = figures["loss_curve.png"]
    marks = loss["lines"]["checkpoint"]
    assert marks.get_marker() == "^" and marks.get_linestyle() == "None" and list(marks.get_xdata()) == [7]
    assert loss["xticks"] == [1, 2, 3, 4, 5, 6, 7]
    vertical = [line for line in loss["lines"].values() if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2]
    assert [line.get_label() for line in vertical] == ["best ROUGE-Lsum (step 7)"]  # the only vertical line


# --- the paired and length analyses, from hand-made predictions files ----------------------------------------------
# 10 validation examples. Prompt tokens sorted are 100 ... 1000; the default buckets (at least 5 each: 10 // 5 = 2)
# split at the ceil(10 / 2) = 5th smallest, 500: examples 0 2 4 5 7 (100 300 500 200 400) up to 500, examples
# 1 3 6 8 9 (900 700 1000 800 600) above.
PROMPT_TOKENS = [100, 900, 300, 700, 500, 200, 1000, 400, 800, 600]
LSUM = {  # each example's ROUGE-Lsum
    "base": [0.0] * 10,
    "checkpoint-100": [0.3, 0.2, 0.4, 0.1, 0.5, 0.3, 0.0, 0.4, 0.2, 0.1],  # the best minus 0.3 on every example
    "checkpoint-200": [0.6, 0.5, 0.7, 0.4, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4],  # the best: mean 5.5 / 10 = 0.55
    "checkpoint-300": [0.5, 0.6, 0.6, 0.5, 0.7, 0.5, 0.4, 0.6, 0.6, 0.3],  # the best minus +0.1 on 6, -0.1 on 4
}
LSUM["final_adapter"] = LSUM["checkpoint-300"]  # the same weights as checkpoint-300
STEPS = {"base": 0, "checkpoint-100": 100, "checkpoint-200": 200, "checkpoint-300": 300, "final_adapter": 300}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def write_predictions(run_dir: Path, name: str, values: list[float]) -> None:
    path = run_dir / "eval_base_predictions.jsonl" if name == "base" else run_dir / name / "eval_predictions.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"case-{i}", "prediction": "p", "reference": "r", "prompt_tokens": t,
                                        "reference_tokens": 20, "prediction_tokens": 18, "rouge1": v, "rouge2": v,
                                        "rougeL": v, "rougeLsum": v}) + "\n"
                            for i, (t, v) in enumerate(zip(PROMPT_TOKENS, values))))


@pytest.fixture()
def analysed_run(tmp_path) -> tuple[Path, list[dict]]:
    rows = []
    for name, values in LSUM.items():
        write_predictions(tmp_path, name, values)
        rows.append(row(name, STEPS[name], mean(values), num_examples=10))
    return tmp_path, rows


def test_paired_differences_of_the_best_checkpoint_by_hand(analysed_run):
    run_dir, rows = analysed_run
    findings = report.analyse(run_dir, rows)
    assert findings.best["checkpoint"] == "checkpoint-200" and findings.left_out == {}
    paired = {r["checkpoint"]: d for r, d in findings.paired}
    assert list(paired) == ["base", "checkpoint-100", "checkpoint-300", "final_adapter"]  # by step, not the best
    # base: every difference is the best's own score, at least 0.3, so every resampled mean is >= 0.3 and <= 0.8.
    assert paired["base"].mean == pytest.approx(0.55, abs=1e-12)
    assert 0.3 <= paired["base"].low < 0.55 < paired["base"].high <= 0.8 and paired["base"].excludes_zero
    # checkpoint-100: 0.3 on every example: every resample's mean is 0.3 (to rounding).
    assert (paired["checkpoint-100"].mean, paired["checkpoint-100"].low, paired["checkpoint-100"].high) == \
        pytest.approx((0.3, 0.3, 0.3), abs=1e-12)
    # checkpoint-300: +0.1 on 6 examples, -0.1 on 4, mean +0.02. A resample's mean is 0.1 (2k - 10) / 10 for k
    # positive draws of 10, k ~ Binomial(10, 0.6): P(k <= 3) = 0.055 and P(k >= 9) = 0.046, both above 0.025, so
    # the interval reaches from -0.04 or lower to +0.08 or higher: it includes 0.
    for name in ("checkpoint-300", "final_adapter"):
        assert paired[name].mean == pytest.approx(0.02, abs=1e-12)
        assert paired[name].low <= -0.04 + 1e-12 and paired[name].high >= 0.08 - 1e-12
        assert not paired[name].excludes_zero
    assert findings.not_distinguishable == ["checkpoint-300", "final_adapter"]

    md = report.summary_markdown(rows, {}, run_dir, findings)
    base, ckpt300 = paired["base"], paired["checkpoint-300"]
    assert (f"**Best by ROUGE-Lsum:** checkpoint-200 (step 200): ROUGE-Lsum 0.5500 [0.510, 0.580]. Paired "
            f"differences (best minus other, 95% interval): base model +0.5500 [{base.low:+.3f}, {base.high:+.3f}], "
            f"excludes 0; final_adapter +0.0200 [{ckpt300.low:+.3f}, {ckpt300.high:+.3f}], includes 0. Not "
            f"distinguishable from (paired interval includes 0): checkpoint-300, final_adapter.  ") in md.splitlines()
    table = [line for line in md.splitlines() if line.startswith("| ") and "excludes" not in line]
    assert f"| base | 0 | 0.0000 | +0.5500 [{base.low:+.3f}, {base.high:+.3f}] | yes |" in table
    assert "| checkpoint-100 | 100 | 0.2500 | +0.3000 [+0.300, +0.300] | yes |" in table
    assert f"| checkpoint-300 | 300 | 0.5300 | +0.0200 [{ckpt300.low:+.3f}, {ckpt300.high:+.3f}] | no |" in table
    assert "## Is checkpoint-200 better? Paired differences in ROUGE-Lsum" in md
    # the base model's row comes first in the results table
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "[" in line][:2] \
        == ["base", "checkpoint-100"]


def test_rouge_lsum_by_prompt_length_by_hand(analysed_run):
    run_dir, rows = analysed_run
    findings = report.analyse(run_dir, rows)
    assert [(b.label, b.indices) for b in findings.buckets] == [("≤ 500", (0, 2, 4, 5, 7)),
                                                                ("> 500", (1, 3, 6, 8, 9))]
    # The base model, the best checkpoint and final_adapter (not checkpoint-100, nor checkpoint-300 of final's step).
    # best up to 500: 0.6 0.7 0.8 0.6 0.7 = 3.4 / 5; above: 0.5 0.4 0.3 0.5 0.4 = 2.1 / 5.
    # final_adapter up to 500: 0.5 0.6 0.7 0.5 0.6 = 2.9 / 5; above: 0.6 0.5 0.4 0.6 0.3 = 2.4 / 5. The base: 0, 0.
    means = {r["checkpoint"]: [i.mean for i in intervals] for r, intervals in findings.by_length}
    assert list(means) == ["base", "checkpoint-200", "final_adapter"]
    assert means["base"] == [0.0, 0.0]
    assert means["checkpoint-200"] == pytest.approx([0.68, 0.42], abs=1e-12)
    assert means["final_adapter"] == pytest.approx([0.58, 0.48], abs=1e-12)
    for _, intervals in findings.by_length:
        assert all(interval.n == 5 and interval.low <= interval.mean <= interval.high for interval in intervals)
    best_short = findings.by_length[1][1][0]
    assert 0.6 <= best_short.low < best_short.high <= 0.8  # resampled means stay within the bucket's values

    md = report.summary_markdown(rows, {}, run_dir, findings)
    assert "| prompt tokens | seen | n | base | checkpoint-200 (best) | final_adapter |" in md
    short_line = next(line for line in md.splitlines() if line.startswith("| ≤ 500 |"))
    assert short_line.startswith("| ≤ 500 | 100-500 | 5 | 0.0000 [0.000, 0.000] | 0.6800 [")
    assert "quantiles of the prompt token counts (up to 4) with at least 5 examples each" in md
    assert "![ROUGE-Lsum by prompt length](rouge_by_length.png)" in md

    # Edges 250, 750 with at least 3: up to 250 holds 2 (100, 200), merged with 251-750 (5): up to 750 holds
    # examples 0 2 3 4 5 7 9, above 750 examples 1 6 8. best: 0.6 0.7 0.4 0.8 0.6 0.7 0.4 = 4.2 / 7;
    # 0.5 0.3 0.5 = 1.3 / 3.
    given = report.analyse(run_dir, rows, [250, 750], 3)
    assert [(b.label, b.indices) for b in given.buckets] == [("≤ 750", (0, 2, 3, 4, 5, 7, 9)), ("> 750", (1, 6, 8))]
    assert [i.mean for i in given.by_length[1][1]] == pytest.approx([0.6, 1.3 / 3], abs=1e-12)
    assert "prompt-token edges 250, 750 (length_buckets)" in given.bucket_rule


def test_the_length_plot_draws_its_csv(analysed_run, monkeypatch):
    run_dir, rows = analysed_run
    drawn = {}
    real_save = report._save

    def save_and_keep(fig, ax, path):  # each series is an errorbar container: its data line, then the bars
        drawn[path.name] = {c.get_label(): list(c.lines[0].get_ydata()) for c in fig.axes[0].containers}
        return real_save(fig, ax, path)

    monkeypatch.setattr(report, "_save", save_and_keep)
    paths = report.write_report(run_dir, rows)
    assert (paths["length_plot"], paths["length_data"]) == (run_dir / "rouge_by_length.png",
                                                            run_dir / "rouge_by_length.csv")
    points = read_csv(run_dir / "rouge_by_length.csv")
    assert list(points[0]) == ["bucket", "prompt_tokens_above", "prompt_tokens_up_to", "prompt_tokens_min",
                               "prompt_tokens_max", "n", "checkpoint", "global_step", "rougeLsum", "rougeLsum_low",
                               "rougeLsum_high"]
    assert [(p["bucket"], p["prompt_tokens_above"], p["prompt_tokens_up_to"], p["prompt_tokens_min"],
             p["prompt_tokens_max"], p["n"], p["checkpoint"]) for p in points[:2]] == [
        ("≤ 500", "", "500", "100", "500", "5", "base"), ("> 500", "500", "", "600", "1000", "5", "base")]
    labels = {"base": "base model", "checkpoint-200": "checkpoint-200 (best)", "final_adapter": "final_adapter"}
    for name, label in labels.items():
        assert drawn["rouge_by_length.png"][label] == pytest.approx(
            [float(p["rougeLsum"]) for p in points if p["checkpoint"] == name], abs=1e-12)
    assert "rouge_by_length.png" in paths["summary"].read_text()


def test_a_missing_or_stale_predictions_file_is_named_once_and_left_out(analysed_run):
    run_dir, rows = analysed_run
    (run_dir / "checkpoint-100" / "eval_predictions.jsonl").unlink()  # deleted with its checkpoint
    write_predictions(run_dir, "checkpoint-300", LSUM["checkpoint-200"])  # rewritten by a scoring of other settings
    old = run_dir / "final_adapter" / "eval_predictions.jsonl"  # written before the per-example records
    old.write_text("".join(json.dumps({"id": f"case-{i}", "prediction": "p", "reference": "r"}) + "\n"
                           for i in range(10)))
    findings = report.analyse(run_dir, rows)
    assert findings.left_out == {
        "checkpoint-100": "no eval_predictions.jsonl (deleted with its checkpoint, e.g. by save_total_limit)",
        "checkpoint-300": "eval_predictions.jsonl holds other predictions than its row (scored again since, with "
                          "other settings)",
        "final_adapter": "eval_predictions.jsonl has no per-example scores (scored before they were recorded; "
                         "--force scores it again)"}
    assert [r["checkpoint"] for r, _ in findings.paired] == ["base"]
    assert [r["checkpoint"] for r, _ in findings.by_length] == ["base", "checkpoint-200"]
    md = report.summary_markdown(rows, {}, run_dir, findings)
    left = [line for line in md.splitlines() if line.startswith("- Left out")]
    assert left == ["- Left out of the paired and length analysis: checkpoint-100: no eval_predictions.jsonl (deleted "
                    "with its checkpoint, e.g. by save_total_limit); checkpoint-300: eval_predictions.jsonl holds "
                    "other predictions than its row (scored again since, with other settings); final_adapter: "
                    "eval_predictions.jsonl has no per-example scores (scored before they were recorded; --force "
                    "scores it again)."]
    assert "| checkpoint-100 | 100 | 0.3000 [0.260, 0.330] |" in md  # the table keeps its row (ROUGE-1 first)
    assert "Distinguishable from every other checkpoint (every paired interval excludes 0)." in md


def test_best_is_never_the_base_model_even_when_it_scores_higher(tmp_path):
    write_predictions(tmp_path, "base", [0.9] * 10)
    write_predictions(tmp_path, "checkpoint-1", [0.7] * 5 + [0.9] * 5)
    rows = [row("base", 0, 0.9, num_examples=10), row("checkpoint-1", 1, 0.8, num_examples=10)]
    assert report.best_row(rows)["checkpoint"] == "checkpoint-1"
    findings = report.analyse(tmp_path, rows)
    # checkpoint-1 minus base: -0.2 on 5 examples, 0 on 5: mean -0.1; every resampled mean is in [-0.2, 0]; the
    # interval ends below 0 unless at least 1 - 0.025 of the resamples draw only zeros, which has probability
    # 0.5^10 < 0.001.
    difference = findings.difference("base")
    assert difference.mean == pytest.approx(-0.1, abs=1e-12) and -0.2 <= difference.low < difference.high < 0
    assert "base model -0.1000 [" in findings.best_line and "excludes 0" in findings.best_line
    table = report.format_table(rows).splitlines()
    assert table[1].split()[0] == "base" and not table[1].endswith("*") and table[2].endswith(" *")
    assert report.format_table([rows[0]]).splitlines()[-1] == "* no trained checkpoint scored yet"


def test_command_line_takes_length_buckets_and_refuses_bad_ones(analysed_run, capsys):
    run_dir, rows = analysed_run
    (run_dir / "eval_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.main([str(run_dir), "--length_buckets", "250", "750", "--length_bucket_min_examples", "3"])
    assert "| ≤ 750 | 100-700 | 7 |" in (run_dir / "eval_summary.md").read_text()
    with pytest.raises(SystemExit) as exit_:
        report.main([str(run_dir), "--length_buckets", "750", "250"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: setting 'length_buckets' = [750, 250]: use prompt token counts")


def test_an_average_of_checkpoints_is_never_the_best_and_sits_after_the_checkpoints(analysed_run):
    """An average of checkpoint-200 and checkpoint-300 that beats the best on every example by 0.1 (mean 0.65): the
    best stays checkpoint-200 (a point of training); the average is the last row, off the step plot and the loss
    plot's checkpoints, without an eval loss of its own (its step, 300, has one), and compared with the best on the
    same examples: best minus it is -0.1 on every example, so every resampled mean is -0.1."""
    run_dir, rows = analysed_run
    name = "average-200+300"
    (run_dir / "averages").mkdir()
    path = run_dir / "averages" / name / "eval_predictions.jsonl"
    write_predictions(run_dir / "averages", name, [v + 0.1 for v in LSUM["checkpoint-200"]])
    average = row(name, 300, 0.65, num_examples=10, average_of=["checkpoint-200", "checkpoint-300"],
                  average_rank=128)
    assert report.row_predictions_path(run_dir, average) == path
    rows = [average, *rows]
    assert report.best_row(rows)["checkpoint"] == "checkpoint-200"
    assert [r["checkpoint"] for r in report.by_step(rows)][-2:] == ["final_adapter", name]
    assert [p["checkpoint"] for p in report.rouge_points(rows)] == ["base", "checkpoint-100", "checkpoint-200",
                                                                     "checkpoint-300"]
    findings = report.analyse(run_dir, rows)
    difference = findings.difference(name)
    assert (difference.mean, difference.low, difference.high) == pytest.approx((-0.1, -0.1, -0.1), abs=1e-12)
    assert f"; {name} -0.1000 [-0.100, -0.100], excludes 0." in findings.best_line
    md = report.summary_markdown(rows, STATE, run_dir, findings)
    assert (f"- Row `{name}`: the exact average of the LoRA updates of checkpoint-200, checkpoint-300 (an adapter "
            f"of rank 128; step: its last member's), never the best: the paired table compares it with the best."
            in md.splitlines())
    line = next(line for line in md.splitlines() if line.startswith(f"| {name} | 300 |"))
    assert line.endswith("| 0.6500 [0.610, 0.680] |  |  | 0 |  |  | 10 |")  # no eval loss, no token counts given
    table = report.format_table(rows).splitlines()
    assert table[-2].split()[0] == name and not table[-2].endswith("*")
    assert table[-1] == "* best by rougeLsum: checkpoint-200 (step 200)"
