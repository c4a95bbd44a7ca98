"""longctx.eval.results: rows equal rouge_score's numbers with seeded intervals; resumable and idempotent (kill -9
included); fingerprints follow content; writes are whole, locked, and leave no lock file behind."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal

import pytest
from rouge_score import rouge_scorer, scoring

from longctx.eval import results
from longctx.eval.generation import Prediction, Prompt
from longctx.eval.job import scoring_settings
from longctx.eval.metrics import ROUGE_TYPES, rouge_per_example, rouge_with_intervals, sentences_per_line
from longctx.run.checkpoints import Checkpoint
from longctx.utils import atomic_write
from longctx.utils.hashing import fingerprint as fingerprint_of
from support.evaluation import SCORE_FLAGS, SCORED, copy_run, rows_of, scored_predictions
from support.launching import Started, run
from support.paths import EVAL_000 as EVAL
from support.paths import REPO_ROOT

# --- rows of a real scoring ----------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_rows_keep_the_standard_fields_and_match_rouge_score_with_intervals(scored_run, tiny_tokenizer):
    from longctx import tiny

    tokenizer = tiny_tokenizer
    out, proc = scored_run
    rows = rows_of(out)
    assert [(r["checkpoint"], r["global_step"]) for r in rows] == [
        ("base", 0), ("checkpoint-2", 2), ("checkpoint-4", 4), ("checkpoint-5", 5), ("final_adapter", 5)]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for row in rows:
        preds = scored_predictions(out, row["checkpoint"])
        assert len(preds) == row["num_examples"] == 4
        assert row["num_empty"] == sum(p["prediction"] == "" for p in preds)
        per_example = [scorer.score(sentences_per_line(p["reference"]), sentences_per_line(p["prediction"]))
                       for p in preds]
        for metric in ROUGE_TYPES:
            expected = sum(s[metric].fmeasure for s in per_example) / len(per_example)
            assert row[metric] == pytest.approx(expected, abs=1e-12)
            assert 0.0 <= row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"] <= 1.0
            # each line carries its own scores, rouge_score's for that pair
            assert [p[metric] for p in preds] == pytest.approx([s[metric].fmeasure for s in per_example], abs=1e-12)
        # token counts of the texts as scored, by the tokenizer without special tokens, and their means in the row
        for p in preds:
            assert p["prediction_tokens"] == len(tokenizer(p["prediction"], add_special_tokens=False)["input_ids"])
            assert p["reference_tokens"] == len(tokenizer(p["reference"], add_special_tokens=False)["input_ids"])
        assert row["mean_prediction_tokens"] == pytest.approx(sum(p["prediction_tokens"] for p in preds) / 4, abs=0.01)
        assert row["mean_reference_tokens"] == pytest.approx(sum(p["reference_tokens"] for p in preds) / 4, abs=0.01)
        # max_new_tokens from 000's config.yaml, the batch size from SCORE_FLAGS; the tiny tokenizer's EOS is id 2
        assert row["generation"] == {"max_new_tokens": 48, "generation_batch_size": 2, "decoding": "greedy",
                                     "stop_token_ids": [2], "padding_side": "left", "dtype": "float32",
                                     "attn_implementation": "sdpa"}
        validation = (REPO_ROOT / row["validation_file"]).read_bytes()
        assert row["validation_sha256"] == hashlib.sha256(validation).hexdigest()
        assert row["num_processes"] == 1 and len(row["eval_fingerprint"]) == 16
        assert ("checkpoint_path" in row) == (row["checkpoint"] != "base")
        # 000 trains with its tiny tokenizer's own template
        assert row["chat_template"] == "tokenizer"
        assert row["chat_template_sha256"] == hashlib.sha256(tiny.CHAT_TEMPLATE.encode("utf-8")).hexdigest()
        # the tiny model never writes <think>: nothing stripped, no raw_prediction kept
        assert row["num_think_stripped"] == 0 and not any("raw_prediction" in p for p in preds)
        # References of the 4 validation records: summary tokens + <|im_end|> by the tokenizer itself, i.e.
        # [27, 31, 27, 27] (sorted 27, 27, 27, 31); none above max_new_tokens 48; the 95th percentile is the
        # ceil(0.95 * 4) = 4th smallest, 31. The predictions files count the summary alone: one fewer.
        lengths = [len(tokenizer(p["reference"], add_special_tokens=False)["input_ids"]) + 1 for p in preds]
        assert sorted(lengths) == [27, 27, 27, 31] and sorted(p["reference_tokens"] for p in preds) == [26, 26, 26, 30]
        assert (row["num_references_over_max_new_tokens"], row["reference_tokens_p95"]) == (0, 31)
        assert 0 <= row["num_hit_max_new_tokens"] <= row["num_examples"]
        assert [p["prompt_tokens"] for p in preds] == PROMPT_TOKENS
    # The short run already shows a progression: the first checkpoint writes (mostly) nothing, later ones text.
    assert rows[1]["num_empty"] > rows[3]["num_empty"]
    assert rows[3]["rougeLsum"] > rows[1]["rougeLsum"]
    assert "scoring the base model and 4 checkpoint(s)" in proc.stdout
    scored = [line for line in proc.stdout.splitlines() if line.startswith("scored ")]
    assert [line.split(" (step")[0] for line in scored] == \
           [f"scored {name}" for name in SCORED]  # one line per row, once it is written; the base model first
    for line, row in zip(scored, rows):
        assert (f"; empty {row['num_empty']}/4; think stripped 0; hit max_new_tokens {row['num_hit_max_new_tokens']}; "
                f"references over max_new_tokens 0; tokens predicted / reference {row['mean_prediction_tokens']:.1f} "
                f"/ {row['mean_reference_tokens']:.1f}; ") in line
    assert "warning:" not in proc.stderr  # no reference is longer than max_new_tokens

    # The report: the base model's row first, the best checkpoint's paired line, the length table (4 examples are
    # fewer than 2 x 5: one bucket) and its plot.
    summary = (out / "eval_summary.md").read_text()
    table = [line.split("|")[1].strip().strip("*") for line in summary.splitlines() if line.startswith("| ")
             and "[" in line and "minus" not in line]
    assert table[:5] == SCORED
    best = max(rows[1:], key=lambda r: r["rougeLsum"])
    assert f"**Best by ROUGE-Lsum:** {best['checkpoint']} (step {best['global_step']}): " in summary
    assert "Paired differences (best minus other, 95% interval): base model " in summary
    assert "4 examples are fewer than 2 x 5: one bucket" in summary and "| all | " in summary
    assert (out / "rouge_by_length.png").is_file() and (out / "rouge_by_length.csv").is_file()
    assert (out / "best_checkpoint").resolve() == (out / best["checkpoint"]).resolve()


# The 4 validation prompts' token counts: their training prompts (longctx.data.chat, 000's settings), in file order.
PROMPT_TOKENS = [480, 738, 597, 603]


@pytest.mark.e2e
def test_the_base_row_is_the_plain_base_model_on_the_same_prompts(scored_run, monkeypatch):
    """The base model's predictions are what the model without any adapter generates from the training prompts with
    the same generation settings; the prompts' token counts are those of the training prompts."""
    from longctx.config import parse_config
    from longctx.data.chat import ChatFormat, template_name
    from longctx.data.tokenizer import load_tokenizer
    from longctx.eval import generation
    from longctx.eval.job import all_setting_names
    from longctx.model.loading import load_base_model
    from longctx.settings import DataArguments, GenerationArguments, ModelArguments

    out, _ = scored_run
    monkeypatch.chdir(REPO_ROOT)
    (model_args, data, gen), _, _ = parse_config(
        ["--config", str(out / "run_config.yaml"), "--generation_batch_size", "2"],
        (ModelArguments, DataArguments, GenerationArguments), tolerated_keys=all_setting_names())
    tokenizer = load_tokenizer(model_args, padding_side="left")
    prompts, _ = generation.build_prompts(tokenizer, data, template_name(model_args))
    chat = ChatFormat(tokenizer, data, template_name(model_args))
    records = [json.loads(line) for line in (REPO_ROOT / data.validation_file).read_text().splitlines()][:4]
    assert [len(chat.encode(r["document"], r["summary"]).prompt_ids) for r in records] == PROMPT_TOKENS
    plain = generation.generate(load_base_model(model_args, training=False).eval(), tokenizer, prompts, gen)
    written = scored_predictions(out, "base")
    assert [p["id"] for p in written] == [p.id for p in prompts]
    assert [p["prediction"] for p in written] == [p.text for p in plain]
    assert [p["prompt_tokens"] for p in written] == [len(p.input_ids) for p in prompts]


@pytest.mark.e2e
def test_second_run_is_a_no_op_and_force_or_new_settings_score_again(scored_run, tmp_path):
    out = copy_run(scored_run[0], tmp_path / "run")
    shutil.copy(scored_run[0] / "eval_results.jsonl", out / "eval_results.jsonl")
    before = (out / "eval_results.jsonl").read_bytes()
    hidden_before = sorted(p.name for p in out.iterdir() if p.name.startswith("."))

    again = run(["bash", EVAL, *SCORE_FLAGS], OUTPUT_DIR=str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already scored with these settings" in again.stdout
    assert "skipped: base, checkpoint-2, checkpoint-4, checkpoint-5, final_adapter; --force scores them again" in \
        again.stdout
    assert "scoring" not in again.stdout and "Loading weights" not in again.stdout + again.stderr  # no model loaded
    assert (out / "eval_results.jsonl").read_bytes() == before
    assert (out / "eval_summary.md").is_file()  # the report is refreshed all the same

    shorter = run(["bash", EVAL, *SCORE_FLAGS, "--max_new_tokens", "8"], OUTPUT_DIR=str(out))
    assert shorter.returncode == 0, shorter.stderr[-3000:]
    rows = rows_of(out)
    assert len(rows) == 10  # the earlier rows stay; the new settings get rows of their own (the base model's too)
    assert len({r["eval_fingerprint"] for r in rows}) == 2
    assert [r["generation"]["max_new_tokens"] for r in rows] == [48] * 5 + [8] * 5
    assert [r["checkpoint"] for r in rows[5:]] == SCORED
    assert "5 row(s) of eval_results.jsonl scored with other settings are not shown" in shorter.stdout

    forced = run(["bash", EVAL, *SCORE_FLAGS, "--max_new_tokens", "8", "--force"], OUTPUT_DIR=str(out))
    assert forced.returncode == 0, forced.stderr[-3000:]
    rows_forced = rows_of(out)
    assert len(rows_forced) == 10  # replaced, not duplicated
    assert [(r["checkpoint"], r["eval_fingerprint"]) for r in rows_forced] == \
           [(r["checkpoint"], r["eval_fingerprint"]) for r in rows]
    for old, new in zip(rows[5:], rows_forced[5:]):  # deterministic: same predictions, same intervals
        assert {k: old[k] for k in old if k.startswith("rouge")} == {k: new[k] for k in new if k.startswith("rouge")}
    # Rows were written 10 times under the lock: no lock file (nor any other hidden file) is left behind.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == hidden_before


@pytest.mark.e2e
def test_killed_run_leaves_whole_rows_and_rerun_finishes_without_duplicates(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "run")
    results_file = out / "eval_results.jsonl"
    proc = Started(["bash", EVAL, "--report_to", "none"], OUTPUT_DIR=str(out))
    try:
        proc.wait_for("scored checkpoint-2 ", timeout=180)  # printed once its row is written
        os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    text = results_file.read_text()
    assert text.endswith("\n")
    killed_rows = [json.loads(line) for line in text.splitlines()]  # every line is a whole row
    assert 2 <= len(killed_rows) < len(SCORED)  # the base model's row and checkpoint-2's at least
    assert [r["checkpoint"] for r in killed_rows] == SCORED[:len(killed_rows)]

    rerun = run(["bash", EVAL, "--report_to", "none"], OUTPUT_DIR=str(out))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    rows = rows_of(out)
    assert [r["checkpoint"] for r in rows] == SCORED  # exactly one row per checkpoint (and the base), in order
    assert rows[:len(killed_rows)] == killed_rows  # the rows from before the kill are kept as they were
    assert f"skipped: {', '.join(SCORED[:len(killed_rows)])}" in rerun.stdout
    assert f"scoring {len(SCORED) - len(killed_rows)} checkpoint(s)" in rerun.stdout  # the base model is not again


# --- settings and fingerprint --------------------------------------------------------------------------------------

def test_fingerprint_follows_validation_content_and_template_not_their_paths(tmp_path, tiny_dir, monkeypatch):
    from longctx.settings import DataArguments, GenerationArguments, ModelArguments

    monkeypatch.chdir(REPO_ROOT)
    validation = tiny_dir / "data" / "validation.jsonl"
    same, changed = tmp_path / "same.jsonl", tmp_path / "changed.jsonl"
    shutil.copy(validation, same)
    changed.write_text(validation.read_text().replace("plaintiff", "claimant", 1))
    model = ModelArguments(model_name_or_path=".cache/tiny_smoke/model", torch_dtype="float32")
    gen = GenerationArguments(max_new_tokens=48, generation_batch_size=6)
    template = {"chat_template": "tokenizer", "chat_template_sha256": "a" * 64}

    def fingerprint(data, gen=gen, template=template):
        return fingerprint_of(scoring_settings(model, data, gen, template))

    prints = [fingerprint(DataArguments(validation_file=str(path))) for path in (validation, same, changed)]
    assert prints[0] == prints[1] != prints[2]
    other_gen = GenerationArguments(max_new_tokens=49, generation_batch_size=6)
    assert fingerprint(DataArguments(validation_file=str(same)), gen=other_gen) != prints[0]
    # another template text (e.g. a new hub snapshot of the tokenizer) is another setting
    assert fingerprint(DataArguments(validation_file=str(same)),
                       template={**template, "chat_template_sha256": "b" * 64}) != prints[0]


def test_select_rows_keeps_one_settings_latest_row_per_checkpoint():
    rows = [{"checkpoint": "checkpoint-1", "eval_fingerprint": "a", "rougeLsum": 0.1},
            {"checkpoint": "checkpoint-1", "eval_fingerprint": "b", "rougeLsum": 0.2},
            {"checkpoint": "checkpoint-1", "eval_fingerprint": "a", "rougeLsum": 0.3},
            {"checkpoint": "checkpoint-2", "eval_fingerprint": "a", "rougeLsum": 0.4}]
    chosen = results.select_rows(rows, "a")
    assert [(r["checkpoint"], r["rougeLsum"]) for r in chosen] == [("checkpoint-1", 0.3), ("checkpoint-2", 0.4)]
    assert results.scored_names(rows, "b") == {"checkpoint-1"}


# --- writing rows --------------------------------------------------------------------------------------------------

def test_a_failed_write_leaves_the_results_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "eval_results.jsonl"
    results.save_row(path, {"checkpoint": "checkpoint-1", "eval_fingerprint": "a", "rouge1": 0.5})
    before = path.read_bytes()

    def die(*_args):
        raise KeyboardInterrupt("killed between writing the new file and renaming it")

    monkeypatch.setattr(atomic_write.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        results.save_row(path, {"checkpoint": "checkpoint-2", "eval_fingerprint": "a", "rouge1": 0.6})
    assert path.read_bytes() == before
    monkeypatch.undo()
    results.save_row(path, {"checkpoint": "checkpoint-2", "eval_fingerprint": "a", "rouge1": 0.6})
    results.save_row(path, {"checkpoint": "checkpoint-1", "eval_fingerprint": "a", "rouge1": 0.7})  # --force
    assert [(r["checkpoint"], r["rouge1"]) for r in results.read_results(path)] == [
        ("checkpoint-2", 0.6), ("checkpoint-1", 0.7)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.jsonl"]  # no lock or temporary file


def test_a_partial_line_from_elsewhere_is_reported_and_dropped(tmp_path, capsys):
    path = tmp_path / "eval_results.jsonl"
    path.write_text('{"checkpoint": "checkpoint-1", "eval_fingerprint": "a"}\n{"checkpoint": "checkp')
    assert [r["checkpoint"] for r in results.read_results(path)] == ["checkpoint-1"]
    assert f"{path}: line 2 is not a results row and is ignored (and dropped at the next write): " \
           "'{\"checkpoint\": \"checkp'" in capsys.readouterr().out
    results.save_row(path, {"checkpoint": "checkpoint-3", "eval_fingerprint": "a"})
    assert [json.loads(line)["checkpoint"] for line in path.read_text().splitlines()] == ["checkpoint-1",
                                                                                        "checkpoint-3"]


def directory_is_locked(directory) -> bool:
    """Whether another holder has the exclusive flock of `directory` (a non-blocking attempt of our own fails)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_rows_are_written_under_a_lock_of_the_run_directory(tmp_path, monkeypatch):
    path = tmp_path / "eval_results.jsonl"
    seen = []
    real_write = results.write_atomic

    def write_and_look(*args, **kwargs):
        seen.append(directory_is_locked(tmp_path))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(results, "write_atomic", write_and_look)
    results.save_row(path, {"checkpoint": "checkpoint-1", "eval_fingerprint": "a"})
    assert seen == [True]  # a second evaluation of the run would have waited here
    assert not directory_is_locked(tmp_path)  # released afterwards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_results.jsonl"]


def test_where_a_directory_cannot_be_locked_a_lock_file_is_used(tmp_path, monkeypatch):
    """NFS turns flock into a byte-range lock that needs a descriptor open for writing: EBADF for a directory."""
    real_flock = fcntl.flock
    locked_paths = []

    def nfs_flock(fd, operation):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EBADF, "Bad file descriptor")
        locked_paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_flock(fd, operation)

    monkeypatch.setattr(results.fcntl, "flock", nfs_flock)
    results.save_row(tmp_path / "eval_results.jsonl", {"checkpoint": "checkpoint-1", "eval_fingerprint": "a"})
    assert locked_paths == [str(tmp_path / ".eval_results.jsonl.lock")]
    assert [r["checkpoint"] for r in results.read_results(tmp_path / "eval_results.jsonl")] == ["checkpoint-1"]


def test_predictions_keep_the_raw_output_where_it_differs_and_a_deleted_checkpoint_gets_none(tmp_path):
    prompts = [Prompt("a", [1, 5, 9], "the court found for acme", 6), Prompt("b", [2, 7], "the claim failed", 4)]
    predictions = [Prediction("the court found for birch", "the court found for birch", False, False),
                   Prediction("", "<think>\nand on", True, True)]
    # rouge1 of a: 4 of 5 unigrams shared both ways, P = R = F = 0.8; rouge2: 3 of 4 bigrams, 0.75; rougeL: the
    # common subsequence "the court found for", 0.8. b is empty: 0 everywhere.
    scores = rouge_per_example([p.text for p in predictions], [p.reference for p in prompts])
    assert [s["rouge2"] for s in scores] == pytest.approx([0.75, 0.0])
    records = results.example_records(prompts, predictions, scores, count_tokens=lambda text: len(text.split()))
    ckpt = Checkpoint(tmp_path / "checkpoint-1", 1)
    ckpt.path.mkdir()
    results.write_predictions(ckpt, records)
    lines = [json.loads(line) for line in (ckpt.path / "eval_predictions.jsonl").read_text().splitlines()]
    assert lines == [
        {"id": "a", "prediction": "the court found for birch", "reference": "the court found for acme",
         "prompt_tokens": 3, "reference_tokens": 5, "prediction_tokens": 5, "rouge1": pytest.approx(0.8),
         "rouge2": pytest.approx(0.75), "rougeL": pytest.approx(0.8), "rougeLsum": pytest.approx(0.8)},
        {"id": "b", "prediction": "", "reference": "the claim failed", "raw_prediction": "<think>\nand on",
         "prompt_tokens": 2, "reference_tokens": 3, "prediction_tokens": 0, "rouge1": 0.0, "rouge2": 0.0,
         "rougeL": 0.0, "rougeLsum": 0.0}]
    assert all(isinstance(line[m], float) for line in lines for m in ROUGE_TYPES)  # 0.0, not rouge_score's int 0
    warnings = []
    results.write_predictions(Checkpoint(tmp_path / "checkpoint-2", 2), records, warn=warnings.append)
    assert warnings == [f"{tmp_path / 'checkpoint-2'} is gone; its predictions are not written"]
    assert not (tmp_path / "checkpoint-2").exists()
    # the base model's predictions live in the run directory, beside eval_results.jsonl
    base = results.BaseModel(tmp_path)
    assert (base.name, base.global_step) == ("base", 0)
    results.write_predictions(base, records)
    assert results.read_predictions(tmp_path / "eval_base_predictions.jsonl") == lines
    assert results.row_predictions_path(tmp_path, {"checkpoint": "base"}) == tmp_path / "eval_base_predictions.jsonl"
    assert results.row_predictions_path(tmp_path, {"checkpoint": "checkpoint-1"}) == \
        ckpt.path / "eval_predictions.jsonl"
    # an average of checkpoints: its adapter directory under averages/
    average = {"checkpoint": "average-1+2", "average_of": ["checkpoint-1", "checkpoint-2"]}
    assert results.is_average(average) and not results.is_average({"checkpoint": "checkpoint-1"})
    assert results.row_predictions_path(tmp_path, average) == \
        tmp_path / "averages" / "average-1+2" / "eval_predictions.jsonl"


# --- intervals -----------------------------------------------------------------------------------------------------

def test_intervals_are_rouge_scores_bootstrap_seeded_and_leave_numpy_alone():
    import numpy as np

    preds = ["the court found for the plaintiff", "", "costs were awarded to the defendant today",
             "the appeal was dismissed"]
    refs = ["the court found for the plaintiff and awarded damages", "the claim failed",
            "costs were awarded", "the appeal was allowed"]
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    got = rouge_with_intervals(preds, refs)
    assert np.random.rand() == expected_next  # the caller's random stream is untouched
    assert got == rouge_with_intervals(preds, refs)  # seeded: reruns give identical intervals

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    aggregator = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=1000)
    for p, r in zip(preds, refs):
        aggregator.add_scores(scorer.score(sentences_per_line(r), sentences_per_line(p)))
    np.random.seed(0)
    reference = aggregator.aggregate()
    for m in ROUGE_TYPES:
        assert got[f"{m}_low"] == pytest.approx(reference[m].low.fmeasure, abs=1e-12)
        assert got[f"{m}_high"] == pytest.approx(reference[m].high.fmeasure, abs=1e-12)
        assert got[f"{m}_low"] <= got[m] <= got[f"{m}_high"]
    assert got["rouge1_low"] < got["rouge1_high"]
