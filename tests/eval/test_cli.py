"""longctx.eval.cli and longctx.eval.scoring: what is scored (the base model first unless --no_base, complete
checkpoints only, already scored ones skipped without verifying them again), bad settings exit 2, --follow scores
checkpoints as training writes them, --preflight."""

from __future__ import annotations

import json
import shutil

import pytest

from longctx import exit_status
from longctx.eval import cli, scoring
from support.evaluation import SCORED, copy_run, inprocess, line_count, rows_of, scored_predictions
from support.launching import Started, run
from support.paths import EVAL_000 as EVAL
from support.paths import REPO_ROOT


@pytest.mark.e2e
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
    assert ("the base model and 4 checkpoint(s) to score: base, checkpoint-2, checkpoint-4, checkpoint-5, "
            "final_adapter") in printed
    # --no_base: the checkpoints alone; a single --checkpoint never scores the base model
    assert inprocess(out, "--preflight", "--no_base") == 0
    assert "\n4 checkpoint(s) to score: checkpoint-2, checkpoint-4, checkpoint-5, final_adapter\n" in \
        capsys.readouterr().out
    assert inprocess(out, "--preflight", "--checkpoint", str(out / "checkpoint-4")) == 0
    assert capsys.readouterr().out == "1 checkpoint(s) to score: checkpoint-4\n"


@pytest.mark.e2e
def test_scored_checkpoints_are_not_verified_again_unless_forced(scored_run, tmp_path, capsys):
    out = copy_run(scored_run[0], tmp_path / "run")
    shutil.copy(scored_run[0] / "eval_results.jsonl", out / "eval_results.jsonl")
    (out / "checkpoint-2" / "manifest.json").unlink()  # verifying checkpoint-2 again would now reject it
    flags = ["--generation_batch_size", "2"]  # the settings it was scored with

    assert inprocess(out, *flags, "--preflight") == exit_status.NOTHING_TO_SCORE  # nothing to do: the report is refreshed
    printed = capsys.readouterr().out
    assert "skipping" not in printed  # listed from its row, not verified (no adapter hashed)
    assert "skipped: base, checkpoint-2, checkpoint-4, checkpoint-5, final_adapter" in printed
    assert (out / "eval_summary.md").is_file()

    assert inprocess(out, *flags, "--preflight", "--force") == 0
    printed = capsys.readouterr().out
    assert f"skipping {out / 'checkpoint-2'}: manifest.json is missing" in printed  # --force verifies everything
    assert "the base model and 3 checkpoint(s) to score: base, checkpoint-4, checkpoint-5, final_adapter" in printed


@pytest.mark.e2e
def test_bad_settings_exit_2_naming_the_setting(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path / "run")
    assert inprocess(out, "--follow_poll_seconds", "0") == 2
    assert "error: setting 'follow_poll_seconds' = 0.0: use a positive number." in capsys.readouterr().err
    assert inprocess(out, "--max_new_tokens", "0") == 2
    assert "error: setting 'max_new_tokens' = 0: use a positive number of tokens." in capsys.readouterr().err
    assert inprocess(out, "--follow", "--checkpoint", str(out / "checkpoint-2")) == 2
    assert "settings 'checkpoint' and 'follow' exclude each other" in capsys.readouterr().err
    assert inprocess(out, "--length_buckets", "65536", "32768") == 2
    assert ("error: setting 'length_buckets' = [65536, 32768]: use prompt token counts above 0 in increasing order"
            in capsys.readouterr().err)
    assert inprocess(out, "--length_bucket_min_examples", "1") == 2
    assert "error: setting 'length_bucket_min_examples' = 1: use 2 or more" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(out / "run_config.yaml", empty / "run_config.yaml")
    assert inprocess(empty) == 2
    assert "holds no complete checkpoint yet" in capsys.readouterr().err
    # Through the launcher with several processes too: the preflight keeps the status 2 (accelerate would give 1).
    proc = run(["bash", EVAL, "--follow_poll_seconds", "0"], OUTPUT_DIR=str(out), NUM_PROCESSES="2")
    assert proc.returncode == 2 and "follow_poll_seconds" in proc.stderr
    assert "accelerate" not in proc.stderr


@pytest.mark.e2e
def test_follow_reports_an_incomplete_checkpoint_once_across_polls(trained_run, tmp_path, capsys, monkeypatch):
    out = copy_run(trained_run, tmp_path / "run", without=("checkpoint-5", "final_adapter"))
    shutil.copytree(trained_run / "checkpoint-5", out / "checkpoint-5",
                    ignore=lambda _d, names: ["manifest.json"] if "manifest.json" in names else [])
    monkeypatch.chdir(REPO_ROOT)
    job = cli.parse_job(["--config", str(out / "run_config.yaml"), "--output_dir", str(out), "--follow"])
    warn, done = scoring.WarnOnce(job.options.follow), set()
    polls = [scoring.pending_checkpoints(job, done, warn) for _ in range(3)]  # nothing is scored between polls
    assert [[c.name for c in todo] for todo, _ in polls] == [["base", "checkpoint-2", "checkpoint-4"]] * 3
    assert [final for _, final in polls] == [False] * 3
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"skipping {out / 'checkpoint-5'}: manifest.json is missing (the save did not finish) "
                       f"(looked at again at the next poll)"]


@pytest.mark.e2e
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
        assert line_count(results) == 3 and proc.proc.poll() is None  # base, checkpoint-2, checkpoint-4
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
    assert [r["checkpoint"] for r in rows_of(out)] == SCORED
    assert output.count("manifest.json is missing") == 1  # reported once, not at every poll
    assert (out / "eval_summary.md").is_file() and (out / "best_checkpoint").is_symlink()


@pytest.mark.e2e
def test_follow_gives_up_after_its_timeout_with_status_1(scored_run, tmp_path, capsys):
    out = copy_run(scored_run[0], tmp_path / "run", without=("final_adapter",))
    shutil.copy(scored_run[0] / "eval_results.jsonl", out / "eval_results.jsonl")
    status = inprocess(out, "--generation_batch_size", "2", "--follow", "--follow_poll_seconds", "0.2",
                       "--follow_timeout_seconds", "1")
    assert status == 1
    assert "no new checkpoint in 1 s and no final_adapter" in capsys.readouterr().err


@pytest.mark.e2e
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
        preds = scored_predictions(out, row["checkpoint"])
        assert (row["num_references_over_max_new_tokens"], row["reference_tokens_p95"]) == (4, 31)
        # One new token: a prediction that is not empty did not end with <|im_end|> (it decodes to nothing), so it
        # stopped at max_new_tokens.
        written.append(sum(p["prediction"] != "" for p in preds))
        assert written[-1] <= row["num_hit_max_new_tokens"] <= 4
        assert f"; hit max_new_tokens {row['num_hit_max_new_tokens']}; references over max_new_tokens 4; " in \
            captured.out
    assert 4 in written  # the later checkpoints write a word for every prompt: all 4 hit the cap


@pytest.mark.e2e
def test_evaluation_refuses_a_missing_chat_template_with_exit_2(trained_run, tmp_path, capsys):
    out = copy_run(trained_run, tmp_path / "run")
    config = out / "run_config.yaml"
    config.write_text(config.read_text().replace("chat_template: null", "chat_template: gone/template.jinja"))
    assert inprocess(out) == 2
    assert capsys.readouterr().err == ("error: setting 'chat_template' = 'gone/template.jinja': file not found; give "
                                       "the .jinja file's path from the repository root (where the launchers run), "
                                       "or leave it unset to use the tokenizer's own template.\n")


@pytest.mark.e2e
def test_a_generation_past_the_models_context_is_refused_before_the_weights_load(trained_run, tmp_path, capsys):
    """The tiny model's max_position_embeddings is 8,192 (longctx.tiny); its longest validation prompt, counted
    with its tokenizer, plus max_new_tokens 8,000 runs past it: exit 2 with the one line, no weight loaded."""
    from transformers import AutoTokenizer

    from longctx.data.chat import ChatFormat, template_name
    from longctx.data.dataset import load_records
    from longctx.settings import DataArguments, ModelArguments

    out = copy_run(trained_run, tmp_path / "run")
    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / ".cache" / "tiny_smoke" / "model")
    data = DataArguments(max_seq_length=1024, max_eval_samples=4)
    chat = ChatFormat(tokenizer, data, template_name(ModelArguments()))
    records = load_records(REPO_ROOT / ".cache" / "tiny_smoke" / "data" / "validation.jsonl", "validation", 4)
    longest = max(len(chat.encode(r["document"], r["summary"]).prompt_ids) for r in records)
    assert inprocess(out, "--max_new_tokens", "8000") == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == (
        f"error: setting 'max_new_tokens' = 8000: the longest validation prompt in .cache/tiny_smoke/data/"
        f"validation.jsonl has {longest:,} tokens, and {longest:,} + 8000 = {longest + 8000:,} exceeds the model's "
        f"max_position_embeddings (8,192); lower max_new_tokens to {8192 - longest} or less, or leave the longest "
        f"prompts out (max_seq_length with length_policy: drop, or truncate_document).")
    assert "Loading weights" not in captured.out + captured.err and not (out / "eval_results.jsonl").exists()


def test_follow_warns_when_the_training_run_holds_the_same_gpus(tmp_path, monkeypatch):
    """run_info.json records the training's machine and GPUs; --follow on that machine with an overlapping
    CUDA_VISIBLE_DEVICES names the shared GPUs. Another machine, other GPUs or a finished run: no warning."""
    import json
    import socket

    (tmp_path / "run_info.json").write_text(json.dumps({"machine": {"host": socket.gethostname(),
                                                                    "gpus": ["0", "1", "2", "3"]}}))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    assert scoring.follow_warning(tmp_path) == (
        "warning: --follow would score on GPU(s) 3, which the training run is using: both would slow down and either "
        "may run out of memory; give the evaluation other GPUs (CUDA_VISIBLE_DEVICES) or score after training.")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert scoring.follow_warning(tmp_path) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    (tmp_path / "final_adapter").mkdir()
    assert scoring.follow_warning(tmp_path) is None
    (tmp_path / "final_adapter").rmdir()
    (tmp_path / "run_info.json").write_text(json.dumps({"machine": {"host": "another-node", "gpus": ["3"]}}))
    assert scoring.follow_warning(tmp_path) is None


# --- averages of checkpoints (--average, --average_last) -----------------------------------------------------------

def score_made_run(run_dir, *flags: str) -> int:
    """The evaluation's main on a run made by support.adapters (no training), from the repository root."""
    return inprocess(run_dir, "--no_base", *flags)


def test_an_average_is_listed_after_the_checkpoints_and_bad_choices_exit_2(tiny_dir, tmp_path, capsys):
    from support.adapters import make_run

    out = make_run(tiny_dir, tmp_path / "run")  # checkpoint-10, -20, -30, final_adapter (step 30)
    assert score_made_run(out, "--preflight", "--average_last", "2") == 0
    assert capsys.readouterr().out == ("4 checkpoint(s) and 1 average to score: checkpoint-10, checkpoint-20, "
                                       "checkpoint-30, final_adapter, average-20+30\n")
    assert inprocess(out, "--preflight", "--average", "final_adapter", "checkpoint-10") == 0  # any order
    assert capsys.readouterr().out == ("the base model, 4 checkpoint(s) and 1 average to score: base, checkpoint-10, "
                                       "checkpoint-20, checkpoint-30, final_adapter, average-10+30\n")
    cases = [
        (["--average_last", "4"], f"setting 'average_last' = 4: {out} holds only 3 complete checkpoint(s) of "
                                  f"distinct steps (checkpoint-10, checkpoint-20, checkpoint-30); use --average_last "
                                  f"3 or fewer."),
        (["--average_last", "1"], "setting 'average_last' = 1: use 2 or more."),
        (["--average", "checkpoint-10", "--average_last", "2"],
         "settings 'average' and 'average_last' exclude each other: give one of them."),
        (["--average_last", "2", "--follow"],
         "settings 'average_last' and 'follow' exclude each other: an average is one more row of a whole run scored "
         "once (--all_checkpoints, as eval_all_checkpoints.sh runs it); drop one of them."),
        (["--average", "checkpoint-30", "final_adapter"],
         "setting 'average' = [checkpoint-30, final_adapter]: checkpoint-30 and final_adapter are both step 30 (the "
         "same weights, or the same name twice); name each checkpoint once."),
        (["--average", "checkpoint-10", "checkpoint-40"],
         f"setting 'average' = [checkpoint-10, checkpoint-40]: no such checkpoint in {out}; its complete checkpoints "
         f"are: checkpoint-10, checkpoint-20, checkpoint-30, final_adapter."),
    ]
    for flags, line in cases:
        for preflight in (["--preflight"], []):  # the launcher's preflight, and the scoring itself
            assert score_made_run(out, *flags, *preflight) == 2, flags
            assert capsys.readouterr().err.splitlines()[-1] == f"error: {line}"
    assert not (out / "eval_results.jsonl").exists() and not (out / "averages").exists()  # nothing scored


def test_an_average_is_scored_again_only_when_its_members_changed(tiny_dir, tmp_path, monkeypatch):
    """Its row names its members' adapter sha256 (from their manifests): the same members are skipped, changed
    ones (a checkpoint written again since) scored again."""
    from support.adapters import make_run

    out = make_run(tiny_dir, tmp_path / "run")
    monkeypatch.chdir(REPO_ROOT)
    job = cli.parse_job(["--config", str(out / "run_config.yaml"), "--output_dir", str(out), "--all_checkpoints",
                         "--no_base", "--average_last", "2"])
    found = [c.name for c in scoring.pending_checkpoints(job, set(), scoring.WarnOnce(False))[0]]
    target = scoring.average_target(job, scoring.checkpoints.find_checkpoints(out))
    assert (target.name, target.global_step, target.path) == ("average-20+30", 30, out / "averages" / "average-20+30")
    shas = [json.loads((out / n / "manifest.json").read_text())["files"]["adapter_model.safetensors"]["sha256"]
            for n in ("checkpoint-20", "checkpoint-30")]
    assert target.member_sha256 == shas
    done = {"checkpoint": "average-20+30", "global_step": 30, "eval_fingerprint": job.fingerprint,
            "average_of": ["checkpoint-20", "checkpoint-30"], "average_sha256": shas}
    rows = [{"checkpoint": name, "eval_fingerprint": job.fingerprint} for name in found[:-1]]
    (out / "eval_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, done]))
    assert scoring.pending_checkpoints(job, set(), scoring.WarnOnce(False))[0] == []
    stale = {**done, "average_sha256": [shas[0], "0" * 64]}
    (out / "eval_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, stale]))
    assert [c.name for c in scoring.pending_checkpoints(job, set(), scoring.WarnOnce(False))[0]] == ["average-20+30"]


@pytest.mark.e2e
def test_an_average_of_two_checkpoints_is_scored_as_one_more_row_and_skipped_on_rerun(scored_run, tiny_dir, tmp_path,
                                                                                      capsys, monkeypatch):
    """checkpoint-4 and checkpoint-5 of the real run: a row average-4+5 at step 5 whose predictions are those of a
    model holding the mean of the two checkpoints' merged weights (merged by peft one by one, averaged here, generated
    from with the evaluation's own prompts and greedy settings); a rerun skips it."""
    from longctx.data.chat import template_name
    from longctx.data.tokenizer import load_tokenizer
    from longctx.eval.generation import build_prompts, generate
    from support.adapters import base_model, merged_weights

    out = copy_run(scored_run[0], tmp_path / "run")
    shutil.copy(scored_run[0] / "eval_results.jsonl", out / "eval_results.jsonl")
    flags = ["--generation_batch_size", "2", "--average", "checkpoint-5", "checkpoint-4"]  # any order
    assert inprocess(out, *flags) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'averages' / 'average-4+5'}: average of checkpoint-4, checkpoint-5: the exact mean of " \
           f"their LoRA updates, an adapter of rank 128 (2 x 64); truncated to rank 64, " in printed
    assert "\nscoring 1 average of " in printed and "\nscored average-4+5 (step 5): " in printed
    rows = rows_of(out)
    assert [r["checkpoint"] for r in rows] == [*SCORED, "average-4+5"]
    row = rows[-1]
    shas = [json.loads((out / n / "manifest.json").read_text())["files"]["adapter_model.safetensors"]["sha256"]
            for n in ("checkpoint-4", "checkpoint-5")]
    assert (row["global_step"], row["average_of"], row["average_steps"], row["average_sha256"], row["average_rank"]) \
        == (5, ["checkpoint-4", "checkpoint-5"], [4, 5], shas, 128)
    assert row["checkpoint_path"] == str((out / "averages" / "average-4+5").resolve())
    assert row["eval_fingerprint"] == rows[0]["eval_fingerprint"] and row["truncated_svd_error"]["rank"] == 64

    monkeypatch.chdir(REPO_ROOT)  # the run's settings name files from there
    job = cli.parse_job(["--config", str(out / "run_config.yaml"), "--output_dir", str(out), "--all_checkpoints",
                         "--generation_batch_size", "2"])
    tokenizer = load_tokenizer(job.model, padding_side="left")
    prompts, _ = build_prompts(tokenizer, job.data, template_name(job.model))
    first, second = (merged_weights(tiny_dir, out / n) for n in ("checkpoint-4", "checkpoint-5"))
    mean_model = base_model(tiny_dir)
    mean_model.load_state_dict({name: (first[name] + second[name]) / 2 for name in first})
    expected = [p.text for p in generate(mean_model, tokenizer, prompts, job.generation)]
    assert [p["prediction"] for p in scored_predictions_of_average(out)] == expected
    assert any(expected)  # the later checkpoints write text: the comparison is not of empty strings

    assert inprocess(out, *flags) == 0  # resumable: found scored, skipped, one row
    assert "skipped: base, checkpoint-2, checkpoint-4, checkpoint-5, final_adapter, average-4+5;" in \
        capsys.readouterr().out
    assert [r["checkpoint"] for r in rows_of(out)] == [*SCORED, "average-4+5"]
    summary = (out / "eval_summary.md").read_text()
    assert "- Row `average-4+5`: the exact average of the LoRA updates of checkpoint-4, checkpoint-5" in summary
    assert (out / "best_checkpoint").resolve().parent == out.resolve()  # a checkpoint of the run, never the average


def scored_predictions_of_average(out):
    return [json.loads(line) for line in
            (out / "averages" / "average-4+5" / "eval_predictions.jsonl").read_text().splitlines()]
