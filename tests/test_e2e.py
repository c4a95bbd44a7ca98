"""End to end through the real launchers: train -> checkpoints -> final adapter -> eval_all_checkpoints.sh -> ROUGE
rows that match rouge_score -> W&B offline run read back; the same from parquet files; no warning a user cannot act
on. The run is the session's reference run (conftest.reference_run); several processes and machines are compared
with it in test_equivalence.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from longctx.eval.metrics import ROUGE_TYPES, sentences_per_line
from longctx.utils.hashing import sha256_file
from support.launching import REFERENCE, assert_same_steps, run, step_metrics, wandb_records
from support.paths import EVAL_000 as EVAL
from support.paths import REPO_ROOT
from support.paths import TRAIN_000 as TRAIN

pytestmark = pytest.mark.e2e


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of an offline W&B run."""
    return [r["history"]["item"] for r in wandb_records(run_dir) if r.get("type") == "history"]


@pytest.fixture()
def single_run(reference_run):
    return reference_run


def test_the_tests_of_the_reference_run_share_one_worker_so_it_is_trained_once(reference_run, request):
    """conftest's grouping is in effect: under pytest-xdist (--dist loadgroup) the test id carries its group, which
    holds only when conftest marks the tests before xdist reads the marks (a session fixture is per worker)."""
    under_xdist = "PYTEST_XDIST_WORKER" in os.environ
    assert request.node.nodeid.endswith("@reference") == under_xdist, request.node.nodeid


def test_single_process_writes_checkpoints_final_adapter_and_run_info(single_run):
    out, proc = single_run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-7"]
    for ckpt in out.glob("checkpoint-*"):
        assert (ckpt / "adapter_model.safetensors").stat().st_size > 0
        assert (ckpt / "trainer_state.json").is_file()
        assert (ckpt / "optimizer.pt").is_file()
    final = out / "final_adapter"
    assert (final / "adapter_model.safetensors").stat().st_size > 0
    assert (final / "tokenizer_config.json").is_file()
    assert json.loads((final / "final_state.json").read_text())["global_step"] == 7

    info = json.loads((out / "run_info.json").read_text())
    assert len(info["git"]["commit"] or "") == 40
    assert info["packages"]["transformers"] and info["packages"]["peft"]
    assert info["attn_implementation"] == "sdpa"
    assert "max_seq_length: 1024" in (out / "run_config.yaml").read_text()

    report = [json.loads(line) for line in (out / "length_report.jsonl").read_text().splitlines()]
    assert {r["id"] for r in report} == {"case-00000", "case-00001"}
    assert all(r["length_action"] == "drop" and r["original_tokens"] > 1024 for r in report)
    assert "train: 16 records, 2 dropped, 0 truncated" in proc.stdout
    assert "attention: sdpa" in proc.stdout


def test_final_adapter_loads_and_changes_the_model(single_run, tiny_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = single_run
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    ids = torch.arange(5, 40).unsqueeze(0)
    before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(out / "final_adapter"))
    after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3  # a trained (non-empty, non-zero) adapter


def test_wandb_offline_run_has_train_and_eval_loss(single_run):
    out, proc = single_run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = wandb_history(runs[0])
    train_losses = [h["train/loss"] for h in history if "train/loss" in h]
    eval_rows = [h for h in history if "eval/loss" in h]
    assert len(train_losses) == 7 and all(0 < x < 20 for x in train_losses)
    assert [h["train/global_step"] for h in eval_rows] == [3, 6, 7]  # every eval_steps, and at the end
    assert all(abs(h["eval/perplexity"] - __import__("math").exp(h["eval/loss"])) < 1e-3 * h["eval/perplexity"]
               for h in eval_rows)
    assert all(h["train/tokens_per_second_per_gpu"] > 0 for h in history if "train/loss" in h)
    assert "wandb sync" in proc.stdout


def test_wandb_config_holds_the_projects_settings_commit_and_data_hashes(single_run):
    """Runs are compared on the dashboard by these: every resolved setting of the project (not only transformers'
    TrainingArguments), the git commit, and the content hash of the data files."""
    out, _ = single_run
    (folder,) = (out / "wandb").glob("offline-run-*")
    config = {}
    for record in wandb_records(folder):
        if record.get("type") == "run":
            config.update(record["run"]["config"]["update"])
        elif record.get("type") == "config":
            config.update(record["config"]["update"])
    info = json.loads((out / "run_info.json").read_text())
    assert config["max_seq_length"] == 1024 and config["length_policy"] == "drop" and config["tiled_mlp"] is False
    assert config["train_file"] == ".cache/tiny_smoke/data/train.jsonl" and config["lora_r"] == 64
    assert config["max_train_samples"] == 16 and config["watchdog_timeout_seconds"] == 900
    assert config["git_commit"] == info["git"]["commit"] and len(config["git_commit"]) == 40
    assert config["files_sha256"] == info["identity"]["files_sha256"]
    assert config["files_sha256"]["train_file"] == sha256_file(REPO_ROOT / ".cache/tiny_smoke/data/train.jsonl")


def test_eval_all_checkpoints_rows_match_rouge_score(single_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(single_run[0], out, symlinks=True)
    proc = run(["bash", str(EVAL), "--report_to", "none"], timeout=600, OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    assert [(r["checkpoint"], r["global_step"]) for r in rows] == [
        ("base", 0), ("checkpoint-3", 3), ("checkpoint-6", 6), ("checkpoint-7", 7), ("final_adapter", 7)]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for row in rows:
        file = out / ("eval_base_predictions.jsonl" if row["checkpoint"] == "base" else
                      f"{row['checkpoint']}/eval_predictions.jsonl")
        preds = [json.loads(line) for line in file.open()]
        assert len(preds) == row["num_examples"] == 4
        assert set(preds[0]) == {"id", "prediction", "reference", "prompt_tokens", "reference_tokens",
                                 "prediction_tokens", *ROUGE_TYPES}
        for metric in ROUGE_TYPES:
            expected = sum(scorer.score(sentences_per_line(p["reference"]), sentences_per_line(p["prediction"]))
                           [metric].fmeasure for p in preds) / len(preds)
            assert row[metric] == pytest.approx(expected, abs=1e-12)
            assert 0.0 <= row[metric] <= 1.0
    best = max(rows[1:], key=lambda r: r["rougeLsum"])  # never the base model
    marked = [line for line in proc.stdout.splitlines() if line.rstrip().endswith(" *")]
    assert len(marked) == 1 and marked[0].startswith(best["checkpoint"])


def test_parquet_data_trains_and_scores_like_the_same_records_in_jsonl(single_run, tiny_dir, tmp_path):
    """The README documents parquet input: the same 16 training and 4 validation records as parquet files give the
    JSONL run's per-step losses, and evaluation reads the parquet validation file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def to_parquet(name: str, count: int) -> Path:
        records = [json.loads(line) for line in (tiny_dir / "data" / f"{name}.jsonl").read_text().splitlines()]
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(records[:count]), path)
        return path

    train, validation = to_parquet("train", 16), to_parquet("validation", 4)
    out = tmp_path / "run"
    proc = run(["bash", TRAIN, *REFERENCE, "--train_file", train, "--validation_file", validation, "--report_to",
                "none"], OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train: 16 records, 2 dropped, 0 truncated" in proc.stdout
    assert_same_steps(step_metrics(out), step_metrics(single_run[0]))

    scored = run(["bash", EVAL, "--report_to", "none", "--max_new_tokens", "8"], OUTPUT_DIR=str(out))
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in rows] == ["base", "checkpoint-3", "checkpoint-6", "checkpoint-7", "final_adapter"]
    assert all(r["num_examples"] == 4 and r["validation_file"] == str(validation) for r in rows)
    predictions = [json.loads(line) for line in (out / "final_adapter" / "eval_predictions.jsonl").open()]
    assert [p["id"] for p in predictions] == pq.read_table(validation).column("id").to_pylist()


def test_the_quick_start_prints_no_warning(single_run, tmp_path):
    """Every warning a quick-start run printed was one a user cannot act on (torch's pin_memory without an
    accelerator, DeepSpeed's "no GPU found", accelerate's thread notice, peft's use of a deprecated transformers
    name): each is silenced at its source. The same commands as the quick start, with fewer steps."""
    out = tmp_path / "run"
    shutil.copytree(single_run[0], out, symlinks=True)
    scored = run(["bash", EVAL], OUTPUT_DIR=str(out))
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    for proc in (single_run[1], scored):
        lines = (proc.stdout + proc.stderr).splitlines()
        assert [line for line in lines if "warning" in line.lower()] == []
    plan = [line for line in single_run[1].stdout.splitlines() if line.startswith("plan:")]
    assert plan == ["plan: CPU run, no GPU memory limit to check (PLAN=1 prints the plan)"]
