"""longctx.eval.wandb_log: ROUGE into the training run (resumed) against each checkpoint's training step (the base
model at step 0), one prediction table per checkpoint, the length table; without the training run's id, a new run of
the group. Offline runs read back with `wandb leet inspect`."""

from __future__ import annotations

import json

import pytest

from longctx.eval.wandb_log import PREDICTION_COLUMNS
from support.evaluation import SCORED, copy_run, rows_of
from support.launching import run, wandb_records
from support.paths import EVAL_000 as EVAL


@pytest.mark.e2e
def test_wandb_resumes_the_training_run_and_logs_rouge_at_each_checkpoint_step(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "run")
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
    logged = [r["history"]["item"] for r in records if r.get("type") == "history"]
    history = [h for h in logged if "train/global_step" in h]
    rows = rows_of(out)
    assert [h["train/global_step"] for h in history] == [r["global_step"] for r in rows] == [0, 2, 4, 5, 5]
    assert [r["checkpoint"] for r in rows] == SCORED  # the base model at step 0: the curves start before training
    for h, row in zip(history, rows):
        for key in ("rouge1", "rougeLsum", "rougeLsum_low", "rougeLsum_high"):
            assert h[f"rouge/{key}"] == pytest.approx(row[key], abs=1e-12)
        assert h["rouge/num_empty"] == row["num_empty"]
        assert h["rouge/mean_prediction_tokens"] == pytest.approx(row["mean_prediction_tokens"], abs=1e-12)
        table = f"predictions/{row['checkpoint']}"  # one table per checkpoint: nothing overwritten
        assert h[f"{table}._type"] == "table-file" and h[f"{table}.nrows"] == 4
        assert (new[0] / "files" / h[f"{table}.path"]).is_file()
    # After scoring, the report's length table: one line per bucket and shown model, as in rouge_by_length.csv
    (length,) = [h for h in logged if "rouge_by_length._type" in h]
    csv_lines = (out / "rouge_by_length.csv").read_text().splitlines()
    assert length["rouge_by_length._type"] == "table-file" and length["rouge_by_length.nrows"] == len(csv_lines) - 1
    assert (new[0] / "files" / length["rouge_by_length.path"]).is_file()


@pytest.mark.e2e
def test_wandb_without_the_training_run_id_logs_into_a_new_run_of_the_group(trained_run, tmp_path):
    out = copy_run(trained_run, tmp_path / "run", without=("wandb_run.json", "wandb"))
    proc = run(["bash", EVAL, "--report_to", "wandb", "--run_name", "grouped"], OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (new,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(new)
    run_record = next(r["run"] for r in records if r.get("type") == "run")
    assert run_record["run_group"] == "grouped" and run_record["job_type"] == "eval"
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert [h["train/global_step"] for h in history if "train/global_step" in h] == [0, 2, 4, 5, 5]
    assert "wandb sync" in proc.stdout


@pytest.mark.e2e
def test_scoring_again_with_force_logs_under_a_new_key_never_twice_under_one(trained_run, tmp_path):
    """W&B cannot replace logged points: the first scoring logs rouge/*, a --force re-scoring of the same
    checkpoints rouge@2/* (and its tables predictions@2/*), both into the training run; wandb_run.json records which
    key holds which scoring. A rerun without --force scores nothing and logs nothing."""
    out = copy_run(trained_run, tmp_path / "run")
    train_id = json.loads((out / "wandb_run.json").read_text())["id"]
    for flags in ([], ["--force"], []):
        proc = run(["bash", EVAL, *flags], OUTPUT_DIR=str(out))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folders = sorted(set((out / "wandb").glob(f"offline-run-*-{train_id}")))
    assert len(folders) == 3  # training's, the first scoring's, the --force scoring's (the last rerun logged nothing)
    first_logged, forced_logged = ([r["history"]["item"] for r in wandb_records(f) if r.get("type") == "history"]
                                   for f in folders[1:])
    first, forced = ([h for h in logged if "train/global_step" in h] for logged in (first_logged, forced_logged))
    assert [h["train/global_step"] for h in first] == [h["train/global_step"] for h in forced] == [0, 2, 4, 5, 5]
    assert all("rouge/rougeLsum" in h and not any(k.startswith("rouge@") for k in h) for h in first)
    assert all("rouge@2/rougeLsum" in h and not any(k.startswith("rouge/") for k in h) for h in forced)
    assert {k for h in forced for k in h if k.startswith("predictions")} >= {
        f"predictions@2/{name}._type" for name in SCORED}
    assert any("rouge_by_length._type" in h for h in first_logged)
    assert any("rouge_by_length@2._type" in h for h in forced_logged)
    fingerprint = rows_of(out)[0]["eval_fingerprint"]
    assert json.loads((out / "wandb_run.json").read_text())["evaluations"] == [
        {"key": "rouge", "fingerprint": fingerprint, "force": False},
        {"key": "rouge@2", "fingerprint": fingerprint, "force": True}]


def test_an_average_goes_into_the_summary_and_its_table_never_onto_the_step_axis():
    """An average of checkpoints is no point of training: logged at checkpoint-5's step it would sit on the ROUGE
    curves beside checkpoint-5. Its scores go to the run's summary under averages/<name>/ (averages@2/ for the
    second scoring's key), its predictions table beside the checkpoints'."""
    from longctx.eval.wandb_log import WandbLogger

    class FakeRun:
        def __init__(self):
            self.summary, self.logged = {}, []

        def log(self, values):
            self.logged.append(values)

    class FakeWandb:
        @staticmethod
        def Table(columns, data):  # noqa: N802 - wandb's name
            return ("table", tuple(columns), len(data))

    row = {"checkpoint": "average-4+5", "global_step": 5, "average_of": ["checkpoint-4", "checkpoint-5"],
           "rouge1": 0.5, "rougeLsum": 0.4, "rougeLsum_low": 0.3, "rougeLsum_high": 0.45, "num_empty": 0,
           "mean_prediction_tokens": 12.5}
    records = [{"id": "a", "prediction": "p", "reference": "r", "rougeLsum": 0.4, "prompt_tokens": 9,
                "prediction_tokens": 1, "reference_tokens": 1}]
    for key, tables, prefix in (("rouge", "predictions", "averages"), ("rouge@2", "predictions@2", "averages@2")):
        logger = object.__new__(WandbLogger)
        logger.wandb, logger.run, logger.key, logger.tables = FakeWandb, FakeRun(), key, tables
        logger.log(row, records)
        assert logger.run.summary == {f"{prefix}/average-4+5/rouge1": 0.5, f"{prefix}/average-4+5/rougeLsum": 0.4,
                                      f"{prefix}/average-4+5/rougeLsum_low": 0.3,
                                      f"{prefix}/average-4+5/rougeLsum_high": 0.45,
                                      f"{prefix}/average-4+5/mean_prediction_tokens": 12.5}
        assert logger.run.logged == [{f"{tables}/average-4+5": ("table", tuple(PREDICTION_COLUMNS), 1)}]
