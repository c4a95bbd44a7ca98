"""longctx.eval.report: summary table, best checkpoint by ROUGE-Lsum and by eval loss, the two plots and their data as
CSV, the printed table, the best link, the command line.

Hand-made rows and trainer_state.json: no model, no training.
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
          "reference_tokens_p95": 900, "generation": {"max_new_tokens": 512, "decoding": "greedy"}}
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
    assert lines[0] == ("| checkpoint | step | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | eval loss | empty | think "
                        "| max | n |")
    assert lines[1] == ("| checkpoint-100 | 100 | 0.3500 [0.310, 0.380] | 0.3000 [0.260, 0.330] "
                        "| 0.2500 [0.210, 0.280] | 0.3000 [0.260, 0.330] | 2.4000 | 2 | 0 | 5 | 12 |")
    assert lines[2].startswith("| **checkpoint-200** | 200 |")  # the best, in bold
    assert [line.split("|")[1].strip() for line in lines[3:]] == ["checkpoint-300", "final_adapter"]
    assert lines[4].endswith("| 1.9000 | 0 | 2 | 1 | 12 |")  # final_adapter: 2 think blocks stripped
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

    def save_and_keep_lines(fig, path):
        drawn[path.name] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                            for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
        real_save(fig, path)

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
                                "empty", "n"]
    # checkpoint-200: rouge1 0.52 + 0.05, rouge2 0.52, rougeL 0.52 - 0.05, Lsum 0.52 in [0.48, 0.55]; 0 empty of 12
    assert table[2].split() == ["checkpoint-200", "200", "0.5700", "0.5200", "0.4700", "0.5200", "[0.480,", "0.550]",
                                "0", "12", "*"]
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

    def save_and_keep(fig, path):
        ax = fig.axes[0]
        figures[path.name] = {"lines": {line.get_label(): line for line in ax.get_lines()},
                              "xticks": list(ax.get_xticks()), "xlim": ax.get_xlim()}
        real_save(fig, path)

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
