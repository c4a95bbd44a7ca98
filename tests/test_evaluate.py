"""Checkpoint evaluation: adapter swapping equals fresh loads, resumable and idempotent rows (kill -9 included),
--follow, two-process generation equal to one, bootstrap intervals, W&B against the training step.

One short real training run (module fixture) provides checkpoint-2, -4, -5 and final_adapter; every test works on
its own copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, subprocess_env
from rouge_score import rouge_scorer, scoring

from longctx import evaluate
from longctx.metrics import ROUGE_TYPES, rouge_with_intervals, sentences_per_line

TRAIN = REPO_ROOT / "experiments" / "000_tiny_smoke" / "launch_train.sh"
EVAL = REPO_ROOT / "experiments" / "000_tiny_smoke" / "eval_all_checkpoints.sh"
# 12 records (2 too long -> dropped) -> 5 optimizer steps; no warmup so that the later checkpoints already write text.
QUICK = ["--max_train_samples", "12", "--max_eval_samples", "4", "--num_train_epochs", "1", "--save_steps", "2",
         "--eval_steps", "2", "--logging_steps", "1", "--warmup_steps", "0"]
NAMES = ["checkpoint-2", "checkpoint-4", "checkpoint-5", "final_adapter"]
EVAL_OUTPUTS = ("eval_results.jsonl", ".eval_results.jsonl.lock", "eval_summary.md", "rouge_by_step.png",
                "loss_curve.png", "best_checkpoint", "eval_predictions.jsonl")


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    """In its own session, so that the whole process group can be killed."""
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO_ROOT, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval_results.jsonl").read_text().splitlines()]


def predictions_of(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "eval_predictions.jsonl").read_text().splitlines()]


def copy_run(src: Path, dst: Path, without: tuple[str, ...] = ()) -> Path:
    """A fresh copy of a run without evaluation outputs (and without the named entries)."""
    shutil.copytree(src, dst, symlinks=True, ignore=lambda _d, names: [n for n in names
                                                                      if n in EVAL_OUTPUTS or n in without])
    return dst


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    return False


def line_count(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.is_file() else 0


def inprocess(run_dir: Path, *flags: str) -> int:
    """evaluate.main in this process (repository root as working directory); returns the exit status."""
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        evaluate.main(["--config", str(run_dir / "run_config.yaml"), "--run_dir", str(run_dir), "--all_checkpoints",
                       "--report_to", "none", *flags])
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir) -> Path:
    """A real training run (W&B offline, so it leaves wandb_run.json) with 3 checkpoints + final_adapter."""
    out = tmp_path_factory.mktemp("trained")
    proc = run(["bash", TRAIN, *QUICK], timeout=600, OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if (p / "adapter_config.json").is_file()) == NAMES
    assert (out / "wandb_run.json").is_file()
    return out


@pytest.fixture(scope="module")
def scored(trained, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the run scored once by eval_all_checkpoints.sh (one process, no W&B)."""
    out = copy_run(trained, tmp_path_factory.mktemp("scored") / "run")
    proc = run(["bash", EVAL, "--report_to", "none"], OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


# --- 1. one base load, adapters swapped ----------------------------------------------------------------------------

def test_swapped_adapters_predict_exactly_what_fresh_loads_predict(trained, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from longctx.checkpoints import find_checkpoints
    from longctx.config import DataArguments, GenerationArguments, ModelArguments, parse_config

    monkeypatch.chdir(REPO_ROOT)
    (model_args, data, gen), _, _ = parse_config(
        ["--config", str(trained / "run_config.yaml"), "--max_new_tokens", "24"],
        (ModelArguments, DataArguments, GenerationArguments), tolerated_keys=set(evaluate.all_setting_names()))
    ckpts = [c.path for c in find_checkpoints(trained, warn=print)]
    # Plus two random adapters that move the model far (distinct, non-empty predictions).
    base = evaluate.load_base_model(model_args, training=False)
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=128, init_lora_weights=False,
                                                target_modules="all-linear"))
        model.save_pretrained(tmp_path / f"random-{seed}")
        base = model.unload()
        ckpts.append(tmp_path / f"random-{seed}")

    tokenizer = evaluate.load_tokenizer(model_args, padding_side="left")
    prompts, _ = evaluate.build_prompts(tokenizer, data)
    swapper = evaluate.AdapterSwapper(evaluate.load_base_model(model_args, training=False).eval())
    swapped = [evaluate.generate(swapper.activate(path), tokenizer, prompts, gen) for path in ckpts]
    assert len(swapper.model.peft_config) == 1  # earlier adapters were deleted, not piled up

    fresh = []
    for path in ckpts:
        model = PeftModel.from_pretrained(evaluate.load_base_model(model_args, training=False), str(path)).eval()
        fresh.append(evaluate.generate(model, tokenizer, prompts, gen))
    assert swapped == fresh
    assert len({tuple(p) for p in swapped}) >= 4  # the adapters really differ: swapping changed the outputs
    assert any(p for preds in swapped for p in preds)


# --- 2. resumable and idempotent -----------------------------------------------------------------------------------

def test_rows_keep_the_standard_fields_and_match_rouge_score_with_intervals(scored):
    out, proc = scored
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
        assert row["generation"] == {"max_new_tokens": 48, "generation_batch_size": 6, "decoding": "greedy",
                                     "stop_token_ids": [2], "padding_side": "left", "dtype": "float32",
                                     "attn_implementation": "sdpa"}
        assert row["validation_sha256"] == evaluate.file_sha256(REPO_ROOT / row["validation_file"])
        assert row["num_processes"] == 1 and len(row["eval_fingerprint"]) == 16
    # The short run already shows a progression: the first checkpoint writes (mostly) nothing, later ones text.
    assert rows[0]["num_empty"] > rows[2]["num_empty"]
    assert rows[2]["rougeLsum"] > rows[0]["rougeLsum"]
    assert "scoring 4 checkpoint(s)" in proc.stdout


def test_second_run_is_a_no_op_and_force_or_new_settings_score_again(scored, tmp_path):
    out = copy_run(scored[0], tmp_path / "run")
    shutil.copy(scored[0] / "eval_results.jsonl", out / "eval_results.jsonl")
    before = (out / "eval_results.jsonl").read_bytes()

    again = run(["bash", EVAL, "--report_to", "none"], OUTPUT_DIR=str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already scored with these settings" in again.stdout
    assert "skipped: checkpoint-2, checkpoint-4, checkpoint-5, final_adapter; --force scores them again" in again.stdout
    assert "scoring" not in again.stdout and "Loading weights" not in again.stdout + again.stderr  # no model loaded
    assert (out / "eval_results.jsonl").read_bytes() == before
    assert (out / "eval_summary.md").is_file()  # the report is refreshed all the same

    shorter = run(["bash", EVAL, "--report_to", "none", "--max_new_tokens", "8"], OUTPUT_DIR=str(out))
    assert shorter.returncode == 0, shorter.stderr[-3000:]
    rows = rows_of(out)
    assert len(rows) == 8  # the earlier rows stay; the new settings get rows of their own
    assert len({r["eval_fingerprint"] for r in rows}) == 2
    assert [r["generation"]["max_new_tokens"] for r in rows] == [48] * 4 + [8] * 4
    assert "4 row(s) of eval_results.jsonl scored with other settings are not shown" in shorter.stdout

    forced = run(["bash", EVAL, "--report_to", "none", "--max_new_tokens", "8", "--force"], OUTPUT_DIR=str(out))
    assert forced.returncode == 0, forced.stderr[-3000:]
    rows_forced = rows_of(out)
    assert len(rows_forced) == 8  # replaced, not duplicated
    assert [(r["checkpoint"], r["eval_fingerprint"]) for r in rows_forced] == \
           [(r["checkpoint"], r["eval_fingerprint"]) for r in rows]
    for old, new in zip(rows[4:], rows_forced[4:]):  # deterministic: same predictions, same intervals
        assert {k: old[k] for k in old if k.startswith("rouge")} == {k: new[k] for k in new if k.startswith("rouge")}


def test_fingerprint_follows_validation_content_not_its_path(tmp_path, trained, monkeypatch):
    from longctx.config import DataArguments, GenerationArguments, ModelArguments

    monkeypatch.chdir(REPO_ROOT)
    validation = REPO_ROOT / ".cache" / "tiny_smoke" / "data" / "validation.jsonl"
    same, changed = tmp_path / "same.jsonl", tmp_path / "changed.jsonl"
    shutil.copy(validation, same)
    changed.write_text(validation.read_text().replace("plaintiff", "claimant", 1))
    model = ModelArguments(model_name_or_path=".cache/tiny_smoke/model", torch_dtype="float32")
    gen = GenerationArguments(max_new_tokens=48, generation_batch_size=6)
    prints = [evaluate.fingerprint(evaluate.eval_settings(model, DataArguments(validation_file=str(path)), gen))
              for path in (validation, same, changed)]
    assert prints[0] == prints[1] != prints[2]
    other_gen = GenerationArguments(max_new_tokens=49, generation_batch_size=6)
    assert evaluate.fingerprint(evaluate.eval_settings(model, DataArguments(validation_file=str(same)),
                                                       other_gen)) != prints[0]


def test_killed_run_leaves_whole_rows_and_rerun_finishes_without_duplicates(trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    results = out / "eval_results.jsonl"
    proc = start(["bash", EVAL, "--report_to", "none"], OUTPUT_DIR=str(out))
    try:
        assert wait_for(lambda: line_count(results) >= 1, timeout=180, proc=proc), proc.stdout.read()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    text = results.read_text()
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


def test_a_failed_write_leaves_the_results_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "eval_results.jsonl"
    evaluate.save_row(path, {"checkpoint": "checkpoint-1", "eval_fingerprint": "a", "rouge1": 0.5})
    before = path.read_bytes()

    def die(*_args):
        raise KeyboardInterrupt("killed between writing the new file and renaming it")

    monkeypatch.setattr(evaluate.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        evaluate.save_row(path, {"checkpoint": "checkpoint-2", "eval_fingerprint": "a", "rouge1": 0.6})
    assert path.read_bytes() == before
    monkeypatch.undo()
    evaluate.save_row(path, {"checkpoint": "checkpoint-2", "eval_fingerprint": "a", "rouge1": 0.6})
    evaluate.save_row(path, {"checkpoint": "checkpoint-1", "eval_fingerprint": "a", "rouge1": 0.7})  # --force
    assert [(r["checkpoint"], r["rouge1"]) for r in evaluate.read_results(path)] == [
        ("checkpoint-2", 0.6), ("checkpoint-1", 0.7)]


def test_a_partial_line_from_elsewhere_is_reported_and_dropped(tmp_path, capsys):
    path = tmp_path / "eval_results.jsonl"
    path.write_text('{"checkpoint": "checkpoint-1", "eval_fingerprint": "a"}\n{"checkpoint": "checkp')
    assert [r["checkpoint"] for r in evaluate.read_results(path)] == ["checkpoint-1"]
    assert "line 2 is not a results row" in capsys.readouterr().out
    evaluate.save_row(path, {"checkpoint": "checkpoint-3", "eval_fingerprint": "a"})
    assert [json.loads(line)["checkpoint"] for line in path.read_text().splitlines()] == ["checkpoint-1",
                                                                                        "checkpoint-3"]


def test_incomplete_checkpoints_are_skipped_naming_what_is_missing(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "run")
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
    (out / "checkpoint-6" / "adapter_model.safetensors").unlink()  # weights missing
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-7")
    (out / "checkpoint-7" / "adapter_config.json").write_text("{not json")  # config unreadable / altered
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")
    (out / "checkpoint-8" / "manifest.json").unlink()  # save never finished
    (out / "checkpoint-9").mkdir()  # empty

    assert inprocess(out, "--preflight") == 0
    printed = capsys.readouterr().out
    assert f"skipping {out / 'checkpoint-6'}: adapter_model.safetensors is missing" in printed
    assert f"skipping {out / 'checkpoint-7'}: adapter_config.json" in printed
    assert f"skipping {out / 'checkpoint-8'}: manifest.json is missing" in printed
    assert f"skipping {out / 'checkpoint-9'}: manifest.json is missing" in printed
    assert "4 checkpoint(s) to score: checkpoint-2, checkpoint-4, checkpoint-5, final_adapter" in printed


def test_bad_settings_exit_2_naming_the_setting(trained, tmp_path, capsys):
    out = copy_run(trained, tmp_path / "run")
    assert inprocess(out, "--follow_poll_seconds", "0") == 2
    assert "setting 'follow_poll_seconds' = 0.0" in capsys.readouterr().err
    assert inprocess(out, "--follow", "--checkpoint", str(out / "checkpoint-2")) == 2
    assert "settings 'checkpoint' and 'follow' exclude each other" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(out / "run_config.yaml", empty / "run_config.yaml")
    assert inprocess(empty) == 2
    assert "holds no complete checkpoint yet" in capsys.readouterr().err
    # Through the launcher with several processes too: the preflight keeps the status 2 (accelerate would give 1).
    proc = run(["bash", EVAL, "--follow_poll_seconds", "0"], OUTPUT_DIR=str(out), NUM_PROCESSES="2")
    assert proc.returncode == 2 and "follow_poll_seconds" in proc.stderr
    assert "accelerate" not in proc.stderr


def test_follow_scores_checkpoints_as_training_writes_them_until_final_adapter(trained, tmp_path):
    staging = tmp_path / "staging"
    out = copy_run(trained, tmp_path / "run", without=("checkpoint-5", "final_adapter"))
    staging.mkdir()
    results = out / "eval_results.jsonl"
    proc = start(["bash", EVAL, "--report_to", "none", "--follow", "--follow_poll_seconds", "0.5"],
                 OUTPUT_DIR=str(out))
    try:
        assert wait_for(lambda: line_count(results) == 2, timeout=180, proc=proc)
        # checkpoint-5 arrives in pieces, as the Trainer writes it: manifest.json last.
        shutil.copytree(trained / "checkpoint-5", out / "checkpoint-5",
                        ignore=lambda _d, names: ["manifest.json"] if "manifest.json" in names else [])
        time.sleep(2)  # a few polls see it incomplete
        assert line_count(results) == 2 and proc.poll() is None
        shutil.copy(trained / "checkpoint-5" / "manifest.json", out / "checkpoint-5" / "manifest.json")
        assert wait_for(lambda: line_count(results) == 3, timeout=120, proc=proc)
        assert proc.poll() is None  # still following: no final_adapter yet
        shutil.copytree(trained / "final_adapter", staging / "final_adapter")
        (staging / "final_adapter").rename(out / "final_adapter")  # train.py moves it into place whole
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = proc.stdout.read()
    assert proc.returncode == 0, output[-3000:]
    assert [r["checkpoint"] for r in rows_of(out)] == NAMES
    assert f"skipping {out / 'checkpoint-5'}: manifest.json is missing" in output
    assert "(looked at again at the next poll)" in output
    assert output.count("manifest.json is missing") == 1  # reported once, not at every poll
    assert (out / "eval_summary.md").is_file() and (out / "best_checkpoint").is_symlink()


def test_follow_gives_up_after_its_timeout_with_status_1(scored, tmp_path, capsys):
    out = copy_run(scored[0], tmp_path / "run", without=("final_adapter",))
    shutil.copy(scored[0] / "eval_results.jsonl", out / "eval_results.jsonl")
    status = inprocess(out, "--follow", "--follow_poll_seconds", "0.2", "--follow_timeout_seconds", "1")
    assert status == 1
    assert "no new checkpoint in 1 s and no final_adapter" in capsys.readouterr().err


# --- 3. data-parallel generation -----------------------------------------------------------------------------------

def test_two_processes_merge_to_the_single_process_predictions(trained, tmp_path):
    # Batches of 1: each of the 2 processes gets 2 of the 4 prompts.
    single, out = copy_run(trained, tmp_path / "single"), copy_run(trained, tmp_path / "run")
    proc = run(["bash", EVAL, "--report_to", "none", "--generation_batch_size", "1"], timeout=600,
               OUTPUT_DIR=str(out), NUM_PROCESSES="2", MASTER_PORT="29623")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "accelerate launch --multi_gpu --num_processes 2" in proc.stdout
    assert "with 2 process(es)" in proc.stdout
    assert proc.stdout.count("* best by rougeLsum") == 1  # rank 0 alone prints and writes
    one = run(["bash", EVAL, "--report_to", "none", "--generation_batch_size", "1"], OUTPUT_DIR=str(single))
    assert one.returncode == 0, one.stderr[-3000:]
    rows1, rows2 = rows_of(single), rows_of(out)
    assert [r["checkpoint"] for r in rows2] == NAMES and [r["num_processes"] for r in rows2] == [2] * 4
    for r1, r2 in zip(rows1, rows2):
        assert r1["eval_fingerprint"] == r2["eval_fingerprint"]  # the process count is not a setting
        assert predictions_of(out / r2["checkpoint"]) == predictions_of(single / r1["checkpoint"])
        assert {k: r1[k] for k in r1 if k.startswith("rouge")} == {k: r2[k] for k in r2 if k.startswith("rouge")}
        assert r1["num_empty"] == r2["num_empty"]


def test_batches_are_dealt_round_robin_and_merge_back_in_order():
    from accelerate import PartialState

    prompts = [evaluate.Prompt(str(i), list(range(n)), "") for i, n in enumerate([5, 9, 2, 7, 7, 1, 3])]
    batches = evaluate.make_batches(prompts, 2)
    assert batches == [[1, 3], [4, 0], [6, 2], [5]]  # longest first, ties in input order

    class Rank:  # what split_between_processes hands process r of n, with PartialState's own arithmetic
        def __init__(self, r, n):
            self.process_index, self.num_processes = r, n

        split_between_processes = PartialState.split_between_processes

    n = 3
    laid_out = [b for r in range(n) for b in batches[r::n]]
    shares = []
    for r in range(n):
        with Rank(r, n).split_between_processes(laid_out) as mine:
            shares.append(mine)
    assert shares == [batches[0::3], batches[1::3], batches[2::3]]


# --- 4. intervals --------------------------------------------------------------------------------------------------

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


# --- 6. W&B --------------------------------------------------------------------------------------------------------

def wandb_records(run_dir: Path) -> list[dict]:
    proc = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                          timeout=120, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_wandb_resumes_the_training_run_and_logs_rouge_at_each_checkpoint_step(trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    train_id = json.loads((out / "wandb_run.json").read_text())["id"]
    before = set((out / "wandb").glob("offline-run-*"))
    proc = run(["bash", EVAL], OUTPUT_DIR=str(out))  # report_to wandb comes from the run's own settings
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"W&B: logging into the training run {train_id} (resumed" in proc.stdout
    new = sorted(set((out / "wandb").glob("offline-run-*")) - before)
    assert len(new) == 1 and new[0].name.endswith(f"-{train_id}")  # the same run id as training

    records = wandb_records(new[0])
    run_record = next(r["run"] for r in records if r.get("type") == "run")
    assert run_record["run_id"] == train_id and run_record["resume"] is True
    metrics = [r["metric"] for r in records if r.get("type") == "metric"]
    assert {"glob_name": "rouge/*", "step_metric": "train/global_step"}.items() <= \
           next(m for m in metrics if m.get("glob_name") == "rouge/*").items()
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    rows = rows_of(out)
    assert [h["train/global_step"] for h in history] == [r["global_step"] for r in rows] == [2, 4, 5, 5]
    for h, row in zip(history, rows):
        for key in ("rouge1", "rougeLsum", "rougeLsum_low", "rougeLsum_high"):
            assert h[f"rouge/{key}"] == pytest.approx(row[key], abs=1e-12)
        assert h["rouge/num_empty"] == row["num_empty"]
        table = f"predictions/{row['checkpoint']}"  # one table per checkpoint: nothing overwritten
        assert h[f"{table}._type"] == "table-file" and h[f"{table}.nrows"] == 4
        assert (new[0] / "files" / h[f"{table}.path"]).is_file()


def test_wandb_without_the_training_run_id_logs_into_a_new_run_of_the_group(trained, tmp_path):
    out = copy_run(trained, tmp_path / "run", without=("wandb_run.json", "wandb"))
    proc = run(["bash", EVAL, "--report_to", "wandb", "--run_name", "grouped"], OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (new,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(new)
    run_record = next(r["run"] for r in records if r.get("type") == "run")
    assert run_record["run_group"] == "grouped" and run_record["job_type"] == "eval"
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert [h["train/global_step"] for h in history] == [2, 4, 5, 5]
    assert "wandb sync" in proc.stdout
