"""longctx.eval.cli: what is scored (complete checkpoints only, already scored ones skipped without verifying them
again), bad settings exit 2, --follow scores checkpoints as training writes them, --preflight."""

from __future__ import annotations

import shutil

from conftest import REPO_ROOT
from eval_support import NAMES, copy_run, inprocess, line_count, predictions_of, rows_of
from launching import EVAL_000 as EVAL, Started, run

from longctx.eval import cli


def test_incomplete_checkpoints_are_skipped_naming_what_is_missing(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path / "run")
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


def test_scored_checkpoints_are_not_verified_again_unless_forced(scored_run, tmp_path, capsys):
    out = copy_run(scored_run[0], tmp_path / "run")
    shutil.copy(scored_run[0] / "eval_results.jsonl", out / "eval_results.jsonl")
    (out / "checkpoint-2" / "manifest.json").unlink()  # verifying checkpoint-2 again would now reject it
    flags = ["--generation_batch_size", "2"]  # the settings it was scored with

    assert inprocess(out, *flags, "--preflight") == cli.NOTHING_TO_SCORE  # nothing to do: the report is refreshed
    printed = capsys.readouterr().out
    assert "skipping" not in printed  # listed from its row, not verified (no adapter hashed)
    assert "skipped: checkpoint-2, checkpoint-4, checkpoint-5, final_adapter" in printed
    assert (out / "eval_summary.md").is_file()

    assert inprocess(out, *flags, "--preflight", "--force") == 0
    printed = capsys.readouterr().out
    assert f"skipping {out / 'checkpoint-2'}: manifest.json is missing" in printed  # --force verifies everything
    assert "3 checkpoint(s) to score: checkpoint-4, checkpoint-5, final_adapter" in printed


def test_bad_settings_exit_2_naming_the_setting(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path / "run")
    assert inprocess(out, "--follow_poll_seconds", "0") == 2
    assert "error: setting 'follow_poll_seconds' = 0.0: use a positive number." in capsys.readouterr().err
    assert inprocess(out, "--max_new_tokens", "0") == 2
    assert "error: setting 'max_new_tokens' = 0: use a positive number of tokens." in capsys.readouterr().err
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


def test_follow_reports_an_incomplete_checkpoint_once_across_polls(trained_run, tmp_path, capsys, monkeypatch):
    out = copy_run(trained_run, tmp_path / "run", without=("checkpoint-5", "final_adapter"))
    shutil.copytree(trained_run / "checkpoint-5", out / "checkpoint-5",
                    ignore=lambda _d, names: ["manifest.json"] if "manifest.json" in names else [])
    monkeypatch.chdir(REPO_ROOT)
    job = cli.parse_job(["--config", str(out / "run_config.yaml"), "--run_dir", str(out), "--follow"])
    warn, done = cli.WarnOnce(job.ev.follow), set()
    polls = [cli.pending_checkpoints(job, done, warn) for _ in range(3)]  # nothing is scored between polls
    assert [[c.name for c in todo] for todo, _ in polls] == [["checkpoint-2", "checkpoint-4"]] * 3
    assert [final for _, final in polls] == [False] * 3
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"skipping {out / 'checkpoint-5'}: manifest.json is missing (the save did not finish) "
                       f"(looked at again at the next poll)"]


def test_follow_scores_checkpoints_as_training_writes_them_until_final_adapter(trained_run, tmp_path):
    staging = tmp_path / "staging"
    out = copy_run(trained_run, tmp_path / "run", without=("checkpoint-5", "final_adapter"))
    staging.mkdir()
    results = out / "eval_results.jsonl"
    proc = Started(["bash", EVAL, "--report_to", "none", "--follow", "--follow_poll_seconds", "0.5"],
                   OUTPUT_DIR=str(out))
    try:
        proc.wait_for("scored checkpoint-4 ", timeout=180)
        # checkpoint-5 arrives in pieces, as the Trainer writes it: manifest.json last.
        shutil.copytree(trained_run / "checkpoint-5", out / "checkpoint-5",
                        ignore=lambda _d, names: ["manifest.json"] if "manifest.json" in names else [])
        line = proc.wait_for(f"skipping {out / 'checkpoint-5'}: ", timeout=60)  # a poll saw it incomplete
        assert line.endswith("manifest.json is missing (the save did not finish) (looked at again at the next poll)")
        assert line_count(results) == 2 and proc.proc.poll() is None
        shutil.copy(trained_run / "checkpoint-5" / "manifest.json", out / "checkpoint-5" / "manifest.json")
        proc.wait_for("scored checkpoint-5 ", timeout=120)
        assert proc.proc.poll() is None  # still following: no final_adapter yet
        shutil.copytree(trained_run / "final_adapter", staging / "final_adapter")
        (staging / "final_adapter").rename(out / "final_adapter")  # train.py moves it into place whole
        status = proc.finish(timeout=120)
    finally:
        proc.kill()
    output = proc.output()
    assert status == 0, output[-3000:]
    assert [r["checkpoint"] for r in rows_of(out)] == NAMES
    assert output.count("manifest.json is missing") == 1  # reported once, not at every poll
    assert (out / "eval_summary.md").is_file() and (out / "best_checkpoint").is_symlink()


def test_follow_gives_up_after_its_timeout_with_status_1(scored_run, tmp_path, capsys):
    out = copy_run(scored_run[0], tmp_path / "run", without=("final_adapter",))
    shutil.copy(scored_run[0] / "eval_results.jsonl", out / "eval_results.jsonl")
    status = inprocess(out, "--generation_batch_size", "2", "--follow", "--follow_poll_seconds", "0.2",
                       "--follow_timeout_seconds", "1")
    assert status == 1
    assert "no new checkpoint in 1 s and no final_adapter" in capsys.readouterr().err


def test_predictions_cut_by_max_new_tokens_and_longer_references_are_counted(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path / "run")
    assert inprocess(out, "--max_new_tokens", "1") == 0
    captured = capsys.readouterr()
    # The 4 validation references take 27, 31, 27 and 27 tokens (summary + <|im_end|>, test_eval_results): all are
    # longer than 1 token, and the 95th percentile is the ceil(0.95 * 4) = 4th smallest, 31. Warned once, before
    # the first checkpoint is generated from.
    warning = ("warning: 4 of 4 validation references are longer than max_new_tokens=1 tokens (summary + end of "
               "turn): their predictions are cut short, which lowers recall. max_new_tokens=31 would cover 95% of "
               "the references.")
    assert captured.err.splitlines().count(warning) == 1
    assert captured.out.index("scored checkpoint-2 ") > 0 and warning not in captured.out
    summary = (out / "eval_summary.md").read_text()
    assert ("- References longer than max_new_tokens=1 tokens (summary + end of turn): 4 of 4; max_new_tokens=31 "
            "would cover 95% of them.") in summary.splitlines()
    written = []
    for row in rows_of(out):
        preds = predictions_of(out / row["checkpoint"])
        assert (row["num_references_over_max_new_tokens"], row["reference_tokens_p95"]) == (4, 31)
        # One new token: a prediction that is not empty did not end with <|im_end|> (it decodes to nothing), so it
        # stopped at max_new_tokens.
        written.append(sum(p["prediction"] != "" for p in preds))
        assert written[-1] <= row["num_hit_max_new_tokens"] <= 4
        assert f"; hit max_new_tokens {row['num_hit_max_new_tokens']}; references over max_new_tokens 4; " in \
            captured.out
    assert 4 in written  # the later checkpoints write a word for every prompt: all 4 hit the cap


def test_evaluation_refuses_a_missing_chat_template_with_exit_2(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path / "run")
    config = out / "run_config.yaml"
    config.write_text(config.read_text().replace("chat_template: null", "chat_template: gone/template.jinja"))
    assert inprocess(out) == 2
    assert capsys.readouterr().err == ("error: setting 'chat_template' = 'gone/template.jinja': file not found; give "
                                       "the .jinja file's path from the repository root (where the launchers run), "
                                       "or leave it unset to use the tokenizer's own template.\n")
