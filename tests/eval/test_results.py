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
from longctx.eval.metrics import ROUGE_TYPES, rouge_with_intervals, sentences_per_line
from longctx.run.checkpoints import Checkpoint
from longctx.utils import atomic_write
from longctx.utils.hashing import fingerprint as fingerprint_of
from support.evaluation import NAMES, SCORE_FLAGS, copy_run, predictions_of, rows_of
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
        ("checkpoint-2", 2), ("checkpoint-4", 4), ("checkpoint-5", 5), ("final_adapter", 5)]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for row in rows:
        preds = predictions_of(out / row["checkpoint"])
        assert len(preds) == row["num_examples"] == 4
        assert row["num_empty"] == sum(p["prediction"] == "" for p in preds)
        per_example = [scorer.score(sentences_per_line(p["reference"]), sentences_per_line(p["prediction"]))
                       for p in preds]
        for metric in ROUGE_TYPES:
            expected = sum(s[metric].fmeasure for s in per_example) / len(per_example)
            assert row[metric] == pytest.approx(expected, abs=1e-12)
            assert 0.0 <= row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"] <= 1.0
        # max_new_tokens from 000's config.yaml, the batch size from SCORE_FLAGS; the tiny tokenizer's EOS is id 2
        assert row["generation"] == {"max_new_tokens": 48, "generation_batch_size": 2, "decoding": "greedy",
                                     "stop_token_ids": [2], "padding_side": "left", "dtype": "float32",
                                     "attn_implementation": "sdpa"}
        validation = (REPO_ROOT / row["validation_file"]).read_bytes()
        assert row["validation_sha256"] == hashlib.sha256(validation).hexdigest()
        assert row["num_processes"] == 1 and len(row["eval_fingerprint"]) == 16
        # 000 trains with its tiny tokenizer's own template
        assert row["chat_template"] == "tokenizer"
        assert row["chat_template_sha256"] == hashlib.sha256(tiny.CHAT_TEMPLATE.encode("utf-8")).hexdigest()
        # the tiny model never writes <think>: nothing stripped, no raw_prediction kept
        assert row["num_think_stripped"] == 0 and not any("raw_prediction" in p for p in preds)
        # References of the 4 validation records: summary tokens + <|im_end|> by the tokenizer itself, i.e.
        # [27, 31, 27, 27] (sorted 27, 27, 27, 31); none above max_new_tokens 48; the 95th percentile is the
        # ceil(0.95 * 4) = 4th smallest, 31.
        lengths = [len(tokenizer(p["reference"], add_special_tokens=False)["input_ids"]) + 1 for p in preds]
        assert sorted(lengths) == [27, 27, 27, 31]
        assert (row["num_references_over_max_new_tokens"], row["reference_tokens_p95"]) == (0, 31)
        assert 0 <= row["num_hit_max_new_tokens"] <= row["num_examples"]
    # The short run already shows a progression: the first checkpoint writes (mostly) nothing, later ones text.
    assert rows[0]["num_empty"] > rows[2]["num_empty"]
    assert rows[2]["rougeLsum"] > rows[0]["rougeLsum"]
    assert "scoring 4 checkpoint(s)" in proc.stdout
    scored = [line for line in proc.stdout.splitlines() if line.startswith("scored ")]
    assert [line.split(" (step")[0] for line in scored] == \
           [f"scored {name}" for name in NAMES]  # one line per checkpoint, once its row is written
    for line, row in zip(scored, rows):
        assert (f"; empty {row['num_empty']}/4; think stripped 0; hit max_new_tokens {row['num_hit_max_new_tokens']}; "
                f"references over max_new_tokens 0; ") in line
    assert "warning:" not in proc.stderr  # no reference is longer than max_new_tokens


@pytest.mark.e2e
def test_second_run_is_a_no_op_and_force_or_new_settings_score_again(scored_run, tmp_path):
    out = copy_run(scored_run[0], tmp_path / "run")
    shutil.copy(scored_run[0] / "eval_results.jsonl", out / "eval_results.jsonl")
    before = (out / "eval_results.jsonl").read_bytes()
    hidden_before = sorted(p.name for p in out.iterdir() if p.name.startswith("."))

    again = run(["bash", EVAL, *SCORE_FLAGS], OUTPUT_DIR=str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already scored with these settings" in again.stdout
    assert "skipped: checkpoint-2, checkpoint-4, checkpoint-5, final_adapter; --force scores them again" in again.stdout
    assert "scoring" not in again.stdout and "Loading weights" not in again.stdout + again.stderr  # no model loaded
    assert (out / "eval_results.jsonl").read_bytes() == before
    assert (out / "eval_summary.md").is_file()  # the report is refreshed all the same

    shorter = run(["bash", EVAL, *SCORE_FLAGS, "--max_new_tokens", "8"], OUTPUT_DIR=str(out))
    assert shorter.returncode == 0, shorter.stderr[-3000:]
    rows = rows_of(out)
    assert len(rows) == 8  # the earlier rows stay; the new settings get rows of their own
    assert len({r["eval_fingerprint"] for r in rows}) == 2
    assert [r["generation"]["max_new_tokens"] for r in rows] == [48] * 4 + [8] * 4
    assert "4 row(s) of eval_results.jsonl scored with other settings are not shown" in shorter.stdout

    forced = run(["bash", EVAL, *SCORE_FLAGS, "--max_new_tokens", "8", "--force"], OUTPUT_DIR=str(out))
    assert forced.returncode == 0, forced.stderr[-3000:]
    rows_forced = rows_of(out)
    assert len(rows_forced) == 8  # replaced, not duplicated
    assert [(r["checkpoint"], r["eval_fingerprint"]) for r in rows_forced] == \
           [(r["checkpoint"], r["eval_fingerprint"]) for r in rows]
    for old, new in zip(rows[4:], rows_forced[4:]):  # deterministic: same predictions, same intervals
        assert {k: old[k] for k in old if k.startswith("rouge")} == {k: new[k] for k in new if k.startswith("rouge")}
    # Rows were written 8 times under the lock: no lock file (nor any other hidden file) is left behind.
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
    assert 1 <= len(killed_rows) < len(NAMES)
    assert [r["checkpoint"] for r in killed_rows] == NAMES[:len(killed_rows)]

    rerun = run(["bash", EVAL, "--report_to", "none"], OUTPUT_DIR=str(out))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    rows = rows_of(out)
    assert [r["checkpoint"] for r in rows] == NAMES  # exactly one row per checkpoint, in order
    assert rows[:len(killed_rows)] == killed_rows  # the rows from before the kill are kept as they were
    assert f"skipped: {', '.join(NAMES[:len(killed_rows)])}" in rerun.stdout
    assert f"scoring {len(NAMES) - len(killed_rows)} checkpoint(s)" in rerun.stdout


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
    prompts = [Prompt("a", [1], "ref a"), Prompt("b", [2], "ref b")]
    predictions = [Prediction("pred a", "pred a", False, False),
                   Prediction("", "<think>\nand on", True, True)]
    ckpt = Checkpoint(tmp_path / "checkpoint-1", 1)
    ckpt.path.mkdir()
    results.write_predictions(ckpt, prompts, predictions)
    assert [json.loads(line) for line in (ckpt.path / "eval_predictions.jsonl").read_text().splitlines()] == [
        {"id": "a", "prediction": "pred a", "reference": "ref a"},
        {"id": "b", "prediction": "", "reference": "ref b", "raw_prediction": "<think>\nand on"}]
    warnings = []
    results.write_predictions(Checkpoint(tmp_path / "checkpoint-2", 2), prompts, predictions, warn=warnings.append)
    assert warnings == [f"{tmp_path / 'checkpoint-2'} is gone; its predictions are not written"]
    assert not (tmp_path / "checkpoint-2").exists()


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
