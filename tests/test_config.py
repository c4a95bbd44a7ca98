"""longctx.config: YAML + flags -> dataclasses, unknown keys, precedence, the 009 reference values, validate()."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from transformers import TrainingArguments

from longctx.config import parse_config, validate
from longctx.errors import ConfigError
from longctx.model.architecture import readable_architecture
from longctx.settings import (
    DATACLASSES,
    DataArguments,
    GenerationArguments,
    LoraArguments,
    MemoryArguments,
    ModelArguments,
    PlanArguments,
    RunArguments,
    Settings,
)
from support.env import subprocess_env, write_jsonl
from support.paths import CONFIG_000, CONFIG_009, EXPERIMENTS_DIR, REPO_ROOT
from support.paths import TRAIN_PY_009 as TRAIN_009


@pytest.fixture()
def bf16_gpu(monkeypatch):
    """009 is sized for H100s (bf16: true); TrainingArguments refuses bf16 on a machine without a bf16 GPU, so
    pretend to be that machine while parsing. Nothing else about the parse depends on the device."""
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)


def check(*groups, world_size: int | None = None, experiment_dir=None) -> None:
    """validate() on the Settings of these groups (any order; memory, run and plan at their defaults when absent),
    with the model's architecture as the entry points read it (its config.json, or the experiment's copy)."""
    kinds = {"model": ModelArguments, "data": DataArguments, "lora": LoraArguments, "memory": MemoryArguments,
             "run": RunArguments, "generation": GenerationArguments, "plan": PlanArguments,
             "training": TrainingArguments}
    defaults = {"memory": MemoryArguments(), "run": RunArguments(), "plan": PlanArguments()}
    settings = Settings(**{name: next((g for g in groups if isinstance(g, cls)), defaults.get(name))
                           for name, cls in kinds.items()})
    validate(settings, world_size=world_size,
             architecture=readable_architecture(settings.model.model_name_or_path, experiment_dir))


def parse_009(*flags: str):
    try:
        return parse_config(["--config", str(CONFIG_009), *flags])
    except ConfigError as err:
        pytest.fail(f"experiments/009_text_summary/config.yaml does not parse with the installed transformers: {err}")


# --- unknown keys and flags -------------------------------------------------------------------------------------


def test_unknown_yaml_key_names_file_key_and_near_match(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("output_dir: out\nmax_seq_lenght: 4096\n")
    with pytest.raises(ConfigError) as info:
        parse_config(["--config", str(config)])
    message = str(info.value)
    assert str(config) in message
    assert "'max_seq_lenght'" in message
    assert "Did you mean 'max_seq_length'?" in message


def test_unknown_command_line_flag_is_an_error_with_a_suggestion(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\n")
    with pytest.raises(ConfigError) as info:
        parse_config(["--config", str(config), "--max_seq_lenght", "4096"])
    message = str(info.value)
    assert "--max_seq_lenght" in message
    assert "'--max_seq_length'" in message


def test_abbreviated_flag_is_not_silently_taken_for_a_setting(tmp_path):
    """`--max_seq_len` is not a setting; argparse's prefix matching must not turn it into --max_seq_length (a YAML
    key `max_seq_len` is rejected, so the flag must be too: one name per setting)."""
    try:
        parsed, _, _ = parse_config(["--output_dir", str(tmp_path), "--max_seq_len", "100"])
    except ConfigError as err:
        assert "--max_seq_len" in str(err) and "'--max_seq_length'" in str(err)
    else:
        value = Settings.from_groups(parsed).data.max_seq_length
        pytest.fail(f"unknown flag --max_seq_len was accepted as an abbreviation (max_seq_length = {value}); "
                    f"build the parsers with allow_abbrev=False")


def test_tolerated_keys_are_returned_as_extra_not_rejected(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nmy_eval_only_key: 3\nlora_r: 8\n")
    parsed, path, extra = parse_config(["--config", str(config)], tolerated_keys={"my_eval_only_key"})
    assert extra == {"my_eval_only_key": 3}
    assert path == str(config)
    assert Settings.from_groups(parsed).lora.lora_r == 8


# --- precedence: code default < config.yaml < flag ----------------------------------------------------------------


def test_precedence_default_then_yaml_then_flag(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nlora_alpha: 7\nmax_seq_length: 2048\nlearning_rate: 0.5\n")
    parsed, path, extra = parse_config(["--config", str(config), "--max_seq_length", "512", "--learning_rate", "0.25"])
    args = Settings.from_groups(parsed)
    data, lora, gen, training = (args.data, args.lora, args.generation,
                                 args.training)
    # code default: in neither the file nor the flags
    assert lora.lora_r == LoraArguments().lora_r == 16
    assert gen.max_new_tokens == GenerationArguments().max_new_tokens
    # config.yaml over the default
    assert lora.lora_alpha == 7 != LoraArguments().lora_alpha
    # flag over config.yaml
    assert data.max_seq_length == 512 and isinstance(data.max_seq_length, int)
    assert training.learning_rate == 0.25
    assert training.output_dir == str(tmp_path / "out")
    assert extra == {}


def test_flags_alone_without_config_file(tmp_path):
    parsed, path, extra = parse_config(["--output_dir", str(tmp_path), "--lora_r", "4"])
    assert path is None and extra == {}
    assert Settings.from_groups(parsed).lora.lora_r == 4
    assert [type(p) for p in parsed] == list(DATACLASSES)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(["--config", str(tmp_path / "absent.yaml")])


# --- the experiments' configs --------------------------------------------------------------------------------------


def test_000_config_parses_to_its_file_values():
    parsed, path, extra = parse_config(["--config", str(CONFIG_000)])
    args = Settings.from_groups(parsed)
    model, data, lora = args.model, args.data, args.lora
    training = args.training
    assert model.model_name_or_path == ".cache/tiny_smoke/model"
    assert data.max_seq_length == 1024 and data.length_policy == "drop"
    assert (lora.lora_r, lora.lora_alpha, lora.lora_dropout) == (64, 64, 0.0)
    assert training.prediction_loss_only is True and training.load_best_model_at_end is False
    assert extra == {}


def test_009_config_parses_to_the_reference_values(bf16_gpu):
    parsed, path, extra = parse_009()
    args = Settings.from_groups(parsed)
    model, data, training = args.model, args.data, args.training
    assert model.model_name_or_path == "Qwen/Qwen3-4B-Instruct-2507"
    assert data.max_seq_length == 262144 and type(data.max_seq_length) is int
    assert training.per_device_train_batch_size == 1
    assert training.gradient_accumulation_steps == 8
    assert training.activation_checkpointing is True
    assert training.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert training.bf16 is True
    # a tenth of the run each (a ratio below 1): 10 checkpoints and evaluations whatever the corpus size
    assert training.eval_steps == 0.1 and training.save_steps == 0.1
    plan = args.plan  # read by the planner only
    assert (plan.plan_gpus, plan.plan_train_records, plan.plan_tokens_per_sample) == (4, 1000, 200000)
    assert training.load_best_model_at_end is False
    assert training.dataloader_num_workers == 4
    assert "zero2" in training.run_name
    assert "wandb" in training.report_to
    assert training.prediction_loss_only is True
    assert extra == {}


def test_009_config_passes_validate_once_its_data_exists(bf16_gpu, tmp_path):
    """Everything but the data paths (which live on the cluster) is valid as written."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"document": "d", "summary": "s"}])
    val = write_jsonl(tmp_path / "validation.jsonl", [{"document": "d", "summary": "s"}])
    parsed, _, _ = parse_009("--train_file", str(train), "--validation_file", str(val))
    check(*parsed)


@pytest.mark.parametrize("experiment, gpus, expected", [
    ("010_text_summary_sp4", 4, (4, None, 262_144, False, False, 32)),
    ("011_million_tokens", 8, (8, 4.0, 1_048_576, True, False, 32)),
])
def test_sequence_parallel_experiments_validate_on_their_gpus(bf16_gpu, tmp_path, experiment, gpus, expected):
    """009's settings but for these (what each config says it changes), valid for the GPUs they are sized for (heads
    from the shipped model_architecture.json, ZeRO-2 from their ds_config_zero2.json)."""
    exp = EXPERIMENTS_DIR / experiment
    train = write_jsonl(tmp_path / "train.jsonl", [{"document": "d", "summary": "s"}])
    val = write_jsonl(tmp_path / "validation.jsonl", [{"document": "d", "summary": "s"}])
    parsed, _, _ = parse_config(["--config", str(exp / "config.yaml"), "--train_file", str(train),
                                 "--validation_file", str(val), "--deepspeed", str(exp / "ds_config_zero2.json")])
    args = Settings.from_groups(parsed)
    memory, model, data, training = (args.memory, args.model, args.data,
                                     args.training)
    assert (memory.sequence_parallel_size, model.rope_yarn_factor, data.max_seq_length, memory.tiled_mlp,
            memory.offload_activations, training.gradient_accumulation_steps) == expected
    assert args.plan.plan_gpus == gpus
    check(*parsed, world_size=gpus, experiment_dir=exp)
    with pytest.raises(ConfigError, match="not a multiple of"):  # one GPU fewer: refused before anything starts
        check(*parsed, world_size=gpus - 1, experiment_dir=exp)


# --- validate(): errors name the setting and the fix ----------------------------------------------------------------


@pytest.fixture()
def valid_args(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"document": "d", "summary": "s"}])
    val = write_jsonl(tmp_path / "validation.jsonl", [{"document": "d", "summary": "s"}])
    return (ModelArguments(), DataArguments(train_file=str(train), validation_file=str(val)), LoraArguments(),
            GenerationArguments(),
            TrainingArguments(output_dir=str(tmp_path / "out"), eval_strategy="steps", eval_steps=10,
                              prediction_loss_only=True, report_to="none"))


def test_validate_accepts_a_valid_configuration(valid_args):
    check(*valid_args)


def test_validate_lora_r_zero_names_setting_and_fix(valid_args):
    model, data, lora, gen, training = valid_args
    with pytest.raises(ConfigError) as info:
        check(model, data, dataclasses.replace(lora, lora_r=0), gen, training)
    assert "'lora_r' = 0" in str(info.value)
    assert "positive rank" in str(info.value)


def test_validate_missing_train_file_names_setting_path_and_fix(valid_args, tmp_path):
    model, data, lora, gen, training = valid_args
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(ConfigError) as info:
        check(model, dataclasses.replace(data, train_file=str(missing)), lora, gen, training)
    message = str(info.value)
    assert "'train_file'" in message and str(missing) in message
    assert "file not found" in message


def test_validate_unset_train_file_says_what_to_set(valid_args):
    model, data, lora, gen, training = valid_args
    with pytest.raises(ConfigError) as info:
        check(model, dataclasses.replace(data, train_file=None), lora, gen, training)
    assert "'train_file' = None" in str(info.value) and ".jsonl" in str(info.value)


def test_validate_prediction_loss_only_false_with_eval_on(valid_args):
    model, data, lora, gen, training = valid_args
    training.prediction_loss_only = False
    with pytest.raises(ConfigError) as info:
        check(model, data, lora, gen, training)
    message = str(info.value)
    assert "'prediction_loss_only' = False" in message
    assert "set it to true" in message


def test_validate_prediction_loss_only_false_is_fine_without_eval(valid_args, tmp_path):
    model, data, lora, gen, _ = valid_args
    training = TrainingArguments(output_dir=str(tmp_path / "out"), prediction_loss_only=False, report_to="none")
    check(model, data, lora, gen, training)


def test_validate_eager_attention_at_long_context(valid_args):
    model, data, lora, gen, training = valid_args
    with pytest.raises(ConfigError, match="'attn_implementation' = 'eager'.*use auto or sdpa"):
        check(dataclasses.replace(model, attn_implementation="eager"),
                 dataclasses.replace(data, max_seq_length=65536), lora, gen, training)


def test_validate_report_to_wandb_without_wandb_installed(valid_args, tmp_path, monkeypatch):
    """Checked by looking the package up, not importing it (importing wandb takes a second of every launch)."""
    import importlib.util

    model, data, lora, gen, _ = valid_args
    training = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="wandb")
    check(model, data, lora, gen, training)  # installed here
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError) as info:
        check(model, data, lora, gen, training)
    assert str(info.value) == ("setting 'report_to' includes wandb but wandb is not installed: pip install -r "
                               "requirements.txt, or set report_to: none.")


def test_validate_refuses_a_padded_generation_batch_that_would_build_a_seq_by_seq_mask(valid_args, monkeypatch):
    model, data, lora, gen, training = valid_args
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)  # flash_attn not installed, here or there
    two = dataclasses.replace(gen, generation_batch_size=2, max_new_tokens=512)
    with pytest.raises(ConfigError) as info:  # 009's length: 2 x (262,144 + 512)^2 = 137,976,348,672 bytes
        check(model, data, lora, two, training)
    assert str(info.value) == (
        "setting 'generation_batch_size' = 2: prompts are padded on the left, and without flash-attention "
        "transformers' SDPA attention then builds a boolean mask of generation_batch_size x (max_seq_length + "
        "max_new_tokens)^2 = 2 x 262,656^2 bytes = 128.5 GiB (the limit is 1 GiB); set generation_batch_size: 1 (one "
        "prompt per batch needs no padding and no mask), or install flash-attn (pip install flash-attn "
        "--no-build-isolation) and use attn_implementation: auto or flash_attention_2.")
    # short prompts: 2 x (16,384 + 512)^2 = 570,949,632 bytes, under 1 GiB: accepted; so is one prompt per batch,
    # and flash-attention asked for by name
    check(model, dataclasses.replace(data, max_seq_length=16_384), lora, two, training)
    check(model, data, lora, dataclasses.replace(two, generation_batch_size=1), training)
    check(dataclasses.replace(model, attn_implementation="flash_attention_2"), data, lora, two, training)


def test_pad_to_multiple_of_is_no_longer_recommended():
    help_text = next(f for f in dataclasses.fields(DataArguments) if f.name == "pad_to_multiple_of").metadata["help"]
    assert "Leave unset" in help_text and "8 suits" not in help_text


# --- sequence_parallel_size: refused before launch, naming the setting, the value and the fix ---------------------


@pytest.fixture()
def sp_args(tmp_path, valid_args):
    """valid_args with a model of Qwen3-4B's heads (32 query, 8 KV: its config.json values) and ZeRO-2."""
    import json

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936}))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    model, data, lora, gen, training = valid_args
    training.deepspeed = str(ds)
    return [dataclasses.replace(model, model_name_or_path=str(model_dir)), data, lora, gen, training,
            MemoryArguments(sequence_parallel_size=4)]


def sp_error(args, world_size=8) -> str:
    with pytest.raises(ConfigError) as info:
        check(*args, world_size=world_size)
    return str(info.value)


def test_sequence_parallel_accepts_heads_world_and_zero_that_fit(sp_args):
    check(*sp_args, world_size=8)  # 32 / 4 query heads, 8 / 4 KV heads per GPU; 2 groups of 4 GPUs
    check(*sp_args, world_size=None)  # PLAN=1 on a laptop: the launch size is not known, the planner checks it
    sp_args[-1] = MemoryArguments(sequence_parallel_size=16)  # 8 KV heads replicated twice: DeepSpeed allows it
    check(*sp_args, world_size=16)


def test_sequence_parallel_refuses_a_world_size_it_does_not_divide(sp_args):
    assert sp_error(sp_args, world_size=6) == (
        "setting 'sequence_parallel_size' = 4: the launch has 6 processes (NUM_PROCESSES x NUM_MACHINES), not a "
        "multiple of 4; launch a multiple of 4 processes, or set sequence_parallel_size to a divisor of 6.")


def test_sequence_parallel_refuses_heads_it_does_not_divide(sp_args):
    sp_args[-1] = MemoryArguments(sequence_parallel_size=3)
    # the sizes 32 query and 8 KV heads allow: 2, 4, 8 (both divide), 16, 32 (query heads divide; KV replicated)
    assert sp_error(sp_args, world_size=6) == (
        f"setting 'sequence_parallel_size' = 3: {sp_args[0].model_name_or_path} has 32 attention heads and 8 KV "
        f"heads; each of the 3 GPUs of a sample attends with heads / 3 of them, so both must divide by it (or 3 by "
        f"the KV heads, which are then replicated): use one of [2, 4, 8, 16, 32].")


def test_sequence_parallel_refuses_training_without_deepspeed_or_with_zero_0(sp_args, tmp_path):
    training = sp_args[4]

    def use_zero(name: str, zero: str) -> str:
        (tmp_path / name).write_text(f'{{"zero_optimization": {zero}}}')
        training.deepspeed = str(tmp_path / name)
        return training.deepspeed

    training.deepspeed = None
    assert sp_error(sp_args) == (
        "setting 'sequence_parallel_size' = 4: it needs DeepSpeed (Ulysses sequence parallelism is DeepSpeed's); "
        "launch with USE_DEEPSPEED=1 (the launcher's default for several processes) or set sequence_parallel_size: 1.")
    zero0 = use_zero("zero0.json", '{"stage": 0}')
    assert sp_error(sp_args) == (
        f"setting 'sequence_parallel_size' = 4: it needs ZeRO stage 1, 2 or 3 and {zero0} sets stage 0 (stage 0 "
        f"crashes under sequence parallelism, DeepSpeed issue #7833); use the experiment's ds_config_zero2.json.")
    zero3 = use_zero("zero3.json", '{"stage": 3, "reduce_scatter": false}')
    assert sp_error(sp_args) == (
        f"setting 'sequence_parallel_size' = 4: under ZeRO stage 3 it needs reduce_scatter: true (DeepSpeed's "
        f"default) in {zero3}'s zero_optimization; remove reduce_scatter: false there.")
    use_zero("zero3.json", '{"stage": 3}')  # reduce_scatter: DeepSpeed's default, true
    check(*sp_args, world_size=8)


def test_sequence_parallel_refuses_eager_attention_and_padding_it_cannot_cut(sp_args):
    model, data = sp_args[0], sp_args[1]
    sp_args[0] = dataclasses.replace(model, attn_implementation="eager")
    sp_args[1] = dataclasses.replace(data, max_seq_length=4096)  # under eager's own 8192-token limit
    assert sp_error(sp_args) == (
        "setting 'attn_implementation' = 'eager': sequence parallelism (sequence_parallel_size 4) works with sdpa or "
        "flash_attention_2 (eager needs a seq x seq mask the Ulysses attention drops); use auto.")
    sp_args[0], sp_args[1] = model, dataclasses.replace(data, pad_to_multiple_of=6)
    assert sp_error(sp_args) == (
        "setting 'pad_to_multiple_of' = 6: every batch is cut into sequence_parallel_size = 4 equal slices; use a "
        "multiple of 4, or leave it unset (batches are then padded to a multiple of 4).")
    sp_args[1] = dataclasses.replace(data, pad_to_multiple_of=8)
    check(*sp_args, world_size=8)


def test_sequence_parallel_size_zero_is_refused(sp_args):
    sp_args[-1] = MemoryArguments(sequence_parallel_size=0)
    assert sp_error(sp_args) == ("setting 'sequence_parallel_size' = 0: use 1 (off) or the number of GPUs that "
                                 "share one sample.")


# --- the real entry point ---------------------------------------------------------------------------------------


def test_train_cluster_help_lists_every_setting():
    result = subprocess.run([sys.executable, str(TRAIN_009), "--config", str(CONFIG_009), "--help"],
                            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"--help exited {result.returncode}: {result.stderr[-2000:]}"
    output = result.stdout
    own = [cls for cls in DATACLASSES if cls is not TrainingArguments]
    assert {ModelArguments, DataArguments, LoraArguments, GenerationArguments} <= set(own)
    for cls in own:
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in output, f"--help does not mention {cls.__name__}.{f.name}"
    for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "deepspeed",
                 "activation_checkpointing", "output_dir"):
        assert f"--{name}" in output
    assert "--config" in output
    # one heading per group, the project's first, transformers' TrainingArguments last
    headings = [line[:-1] for line in output.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == ["options", "model", "data", "LoRA", "memory (long context)",
                        "run (resume, overwrite, watchdog, preemption)",
                        "evaluation (ROUGE: eval_checkpoint.py / eval_all_checkpoints.sh)",
                        "run plan (PLAN=1, python -m longctx.planner; training ignores these)",
                        "transformers TrainingArguments (optimizer, schedule, precision, logging, saving, eval loss)"]
    assert "usage: train_cluster.py --config CONFIG.yaml [--setting value ...]" in output.splitlines()[:2]


def test_train_cluster_rejects_typo_key_before_loading_anything(tmp_path):
    output_dir = tmp_path / "run"
    text = CONFIG_000.read_text().replace("max_seq_length:", "max_seq_lenght:")
    assert "max_seq_lenght:" in text
    config = tmp_path / "config.yaml"
    config.write_text(text)
    result = subprocess.run([sys.executable, str(TRAIN_009), "--config", str(config), "--output_dir",
                             str(output_dir)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "max_seq_lenght" in result.stderr and "max_seq_length" in result.stderr
    assert str(config) in result.stderr
    # stopped before run_info.json, tokenization or weights
    assert not output_dir.exists()
    assert "Loading weights" not in result.stderr + result.stdout


def test_checking_settings_for_the_target_machine_touches_no_gpu(monkeypatch):
    """On a GPU machine TrainingArguments would set up CUDA while parsing; the launcher's and the planner's checks
    (check_this_machine=False) must not: here a GPU is simulated whose set-up fails the test if it happens."""
    import torch

    def no_gpu_setup(*_args, **_kwargs):
        raise AssertionError("the parse touched the GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", no_gpu_setup)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    parsed, _, _ = parse_config(["--config", str(CONFIG_009)], check_this_machine=False)
    training = Settings.from_groups(parsed).training
    assert training.bf16 is True and training.per_device_train_batch_size == 1
