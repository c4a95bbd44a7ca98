"""Every setting the Trainer, the optimizer, PEFT or DeepSpeed would reject is refused by the preflight before any
weights or data: one line naming the setting, exit 2, nothing written. The table holds an invalid value for every
field of the project's settings dataclasses (a new field without an entry fails here) and for the TrainingArguments
a launch commonly sets; each value below says what would otherwise happen."""

from __future__ import annotations

import dataclasses

import pytest

from longctx import exit_status, preflight
from longctx.settings import DATACLASSES, TrainingSettings
from support.paths import CONFIG_000, REPO_ROOT

# setting -> the flags that make it invalid ("{tmp}": the test's temporary directory)
INVALID = {
    # model
    "model_name_or_path": ["--model_name_or_path", "{tmp}/empty_dir"],  # a directory without a model: traceback
    "tokenizer_name_or_path": ["--tokenizer_name_or_path", "{tmp}/empty_dir"],
    "chat_template": ["--chat_template", "{tmp}/missing.jinja"],
    "attn_implementation": ["--attn_implementation", "fast"],
    "rope_yarn_factor": ["--rope_yarn_factor", "0.5"],  # shrinks the context: positions past it untrained
    "torch_dtype": ["--torch_dtype", "int8"],
    "trust_remote_code": ["--trust_remote_code", "maybe"],
    # data
    "train_file": ["--train_file", "{tmp}/missing.jsonl"],
    "validation_file": ["--validation_file", "{tmp}/missing.parquet"],
    "document_field": ["--document_field", " "],
    "summary_field": ["--summary_field", "document"],  # the same field as the document
    "id_field": ["--id_field", ""],
    "max_seq_length": ["--max_seq_length", "0"],
    "length_policy": ["--length_policy", "cut"],
    "on_bad_record": ["--on_bad_record", "ignore"],
    "datasets_cache_dir": ["--datasets_cache_dir", "{tmp}/a_file/cache"],  # below a file: cannot be made
    "max_train_samples": ["--max_train_samples", "0"],
    "max_eval_samples": ["--max_eval_samples", "-1"],
    "preprocessing_num_workers": ["--preprocessing_num_workers", "0"],
    "pad_to_multiple_of": ["--pad_to_multiple_of", "0"],
    # LoRA
    "lora_r": ["--lora_r", "0"],
    "lora_alpha": ["--lora_alpha", "-8"],
    "lora_dropout": ["--lora_dropout", "1.0"],
    "lora_target_modules": ["--lora_target_modules", "q_proj", "nonexistent_proj"],  # peft: after the weights load
    # memory
    "tiled_mlp": ["--tiled_mlp", "maybe"],
    "tiled_mlp_tile_tokens": ["--tiled_mlp_tile_tokens", "0"],
    "offload_activations": ["--offload_activations", "true", "--activation_checkpointing", "false"],
    "sequence_parallel_size": ["--sequence_parallel_size", "0"],
    # run
    "resume": ["--resume", "sometimes"],
    "overwrite": ["--overwrite", "maybe"],
    "watchdog_timeout_seconds": ["--watchdog_timeout_seconds", "0"],
    "step_timeout_seconds": ["--step_timeout_seconds", "-5"],
    "save_every_minutes": ["--save_every_minutes", "0"],
    # evaluation
    "max_new_tokens": ["--max_new_tokens", "0"],
    "generation_batch_size": ["--generation_batch_size", "0"],
    # run plan
    "plan_gpus": ["--plan_gpus", "0"],
    "plan_validation_records": ["--plan_validation_records", "0"],
    "plan_train_records": ["--plan_train_records", "-3"],
    "plan_gpu_peak_tflops": ["--plan_gpu_peak_tflops", "0"],
    "plan_tokens_per_sample": ["--plan_tokens_per_sample", "0"],
    "plan_mfu": ["--plan_mfu", "1.5"],
    # transformers' TrainingArguments: what the dataloader, the optimizer or the scheduler would refuse later
    "per_device_train_batch_size": ["--per_device_train_batch_size", "0"],  # ValueError from the dataloader
    "per_device_eval_batch_size": ["--per_device_eval_batch_size", "0"],
    "gradient_accumulation_steps": ["--gradient_accumulation_steps", "0"],
    "learning_rate": ["--learning_rate", "-1"],  # ValueError from the optimizer
    "weight_decay": ["--weight_decay", "-0.1"],
    "adam_beta1": ["--adam_beta1", "1.0"],
    "adam_beta2": ["--adam_beta2", "1.5"],
    "adam_epsilon": ["--adam_epsilon", "-1"],
    "max_grad_norm": ["--max_grad_norm", "-1"],
    "num_train_epochs": ["--num_train_epochs", "0"],
    "max_steps": ["--max_steps", "-5"],
    "warmup_steps": ["--warmup_steps", "-1"],
    "save_steps": ["--save_steps", "0"],
    "eval_steps": ["--eval_steps", "-1"],  # (0 is valid: transformers then evaluates every logging_steps)
    "logging_steps": ["--logging_steps", "0"],
    "save_total_limit": ["--save_total_limit", "0"],
    "dataloader_num_workers": ["--dataloader_num_workers", "-1"],
    "seed": ["--seed", "-1"],
    "ddp_timeout": ["--ddp_timeout", "0"],
    "lr_scheduler_type": ["--lr_scheduler_type", "fast"],
    "optim": ["--optim", "sgdx"],
}
# Settings no value of which is invalid, and why
ANY_VALUE = {
    "instruction": "any text, the empty one included, is an instruction",
    "system_prompt": "any text, or none",
}
PROJECT_FIELDS = [f.name for cls in DATACLASSES if cls is not TrainingSettings for f in dataclasses.fields(cls)]


def test_the_table_covers_every_setting_of_the_project():
    assert sorted(set(PROJECT_FIELDS) - set(INVALID) - set(ANY_VALUE)) == []


@pytest.mark.parametrize("setting", list(INVALID))
def test_an_invalid_setting_is_one_line_exit_2_before_weights_and_data(setting, tmp_path, tiny_dir, capsys,
                                                                       monkeypatch):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "a_file").write_text("")
    monkeypatch.chdir(REPO_ROOT)
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in INVALID[setting]]
    out = tmp_path / "run"
    status = preflight.main(["--device", "cpu", "--", "--config", str(CONFIG_000), "--output_dir", str(out), *flags])
    captured = capsys.readouterr()
    assert status == exit_status.BAD_INPUT, captured.out + captured.err
    (line,) = captured.err.splitlines()  # one line
    assert line.startswith("error: ") and setting in line, line
    assert "Traceback" not in captured.err and "preflight:" not in captured.out
    assert not out.exists()  # nothing written


def test_the_refusals_name_the_fix(tmp_path, tiny_dir, capsys, monkeypatch):
    """Three of the table's lines in full: what they say is what a user reads."""
    monkeypatch.chdir(REPO_ROOT)
    (tmp_path / "empty").mkdir()
    cases = {
        ("--per_device_train_batch_size", "0"): "error: setting 'per_device_train_batch_size' = 0: use 1 or more.",
        ("--learning_rate", "-1"): "error: setting 'learning_rate' = -1.0: use a positive learning rate, e.g. 1e-4 "
                                   "(LoRA at long context: 1e-4 to 2e-4).",
        ("--lora_target_modules", "nonexistent_proj"): (
            "error: setting 'lora_target_modules' = ['nonexistent_proj']: 'nonexistent_proj' is no linear layer of "
            ".cache/tiny_smoke/model (its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
            "up_proj, v_proj); name some of those, or 'all-linear'."),
        ("--model_name_or_path", str(tmp_path / "empty")): (
            f"error: setting 'model_name_or_path' = '{tmp_path / 'empty'}': this directory holds no model (no "
            f"config.json); point it at a model directory (config.json, weights, tokenizer) or a hub id."),
    }
    for flags, expected in cases.items():
        assert preflight.main(["--device", "cpu", "--", "--config", str(CONFIG_000), "--output_dir",
                               str(tmp_path / "o"), *flags]) == 2
        assert capsys.readouterr().err == expected + "\n"


def test_009s_targets_are_checked_against_its_architecture_without_weights(tmp_path, capsys):
    """The hub model is not on this machine: its skeleton comes from the experiment's model_architecture.json."""
    from longctx.model.loading import linear_layer_names
    from longctx.settings import ModelArguments

    names = linear_layer_names(ModelArguments(), REPO_ROOT / "experiments" / "009_text_summary")
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
