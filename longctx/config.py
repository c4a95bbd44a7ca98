"""config.yaml + command line -> one `Settings` (longctx.settings), parsed by HfArgumentParser, and its validation.

    python experiments/009_text_summary/train_cluster.py --config experiments/009_text_summary/config.yaml --help

Precedence: code default < config.yaml < command-line flag. config.yaml is flat (one key per setting, the same
name as the flag and the attribute); an unknown key or flag is an error that names it. Everything here is checked
before any weights, data or process group is touched (see `validate`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import enum
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .errors import ConfigError
from .settings import (
    DATA_SUFFIXES,
    DATACLASSES,
    DataArguments,
    GenerationArguments,
    MemoryArguments,
    ModelArguments,
    PlanArguments,
    RunArguments,
    Settings,
)
from .utils.flash_attention import flash_attention_2_problem


class SettingsParser(HfArgumentParser):
    """HfArgumentParser whose errors are ConfigErrors (one line, exit 2 through the caller) instead of argparse's
    usage dump, and where a shortened flag is a typo, not a setting."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        message = re.sub(r"(--\w+)/--[\w-]+", r"\1", message)  # argparse names each flag twice (--a_b/--a-b)
        raise ConfigError(f"command line: {message}; see --help for every setting.")


def build_parser(dataclass_types=DATACLASSES) -> HfArgumentParser:
    parser = SettingsParser(
        dataclass_types, usage="%(prog)s --config CONFIG.yaml [--setting value ...]",
        description="Every key of config.yaml is also a flag; precedence: code default < config.yaml < flag. The "
                    "project's settings come first, by group; transformers' TrainingArguments last.")
    parser.add_argument("--config", default=None, help="config.yaml with values for any of the settings below.")
    return parser


def load_yaml(path: str | os.PathLike, known_keys: set[str]) -> dict[str, Any]:
    """Read a flat config.yaml; unknown keys are errors that suggest the nearest known key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (set CONFIG or --config to an existing config.yaml).")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected 'key: value' lines at the top level, got {type(values).__name__}.")
    for key in values:
        if key not in known_keys:
            near = difflib.get_close_matches(str(key), sorted(known_keys), n=1)
            hint = f" Did you mean '{near[0]}'?" if near else " See --help for every setting."
            raise ConfigError(f"{path}: unknown setting '{key}'.{hint}")
    return values


def parse_config(argv: list[str] | None = None, dataclass_types=DATACLASSES, tolerated_keys: set[str] = frozenset(),
                 check_this_machine: bool = True):
    """Parse `--config FILE` plus flags into the dataclasses, flags winning over the file.

    Returns (dataclass instances, config path, extra): config keys in `tolerated_keys` that these dataclasses do
    not define (e.g. training settings read by the evaluation tool) are returned in `extra` instead of rejected.
    check_this_machine=False parses the settings for the machine they are meant for: TrainingArguments then
    accepts bf16 on a machine without a bf16 GPU (checking 009's config on a laptop), and nothing else changes.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)

    parser = build_parser(dataclass_types)
    extra: dict[str, Any] = {}
    if known.config:
        dests = {action.dest for action in parser._actions} - {"help", "config"}
        values = load_yaml(known.config, dests | set(tolerated_keys))
        extra = {k: values.pop(k) for k in list(values) if k not in dests}
        parser.set_defaults(**values)
        for action in parser._actions:  # a value in the file satisfies a required flag
            if action.dest in values:
                action.required = False
    try:
        with _hardware_checks(check_this_machine):
            *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigError:
        raise
    except ValueError as err:  # a dataclass __post_init__ (e.g. TrainingArguments) rejected a value
        raise ConfigError(f"{known.config or 'command line'}: {err}") from err
    refuse_unknown_flags(parser, remaining)
    return tuple(p for p in parsed if not isinstance(p, argparse.Namespace)), known.config, extra


def refuse_unknown_flags(parser: HfArgumentParser, remaining: list[str]) -> None:
    """ConfigError naming the first command-line string `parser` left over, with the nearest flag it knows."""
    if remaining:
        flags = sorted(f"--{d}" for d in {action.dest for action in parser._actions})
        near = difflib.get_close_matches(remaining[0].split("=")[0], flags, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else " See --help for every setting."
        raise ConfigError(f"command line: unknown setting {remaining[0].split('=')[0]!r}.{hint}")


def parse_settings(argv: list[str] | None = None, extra_groups: tuple = (),
                   check_this_machine: bool = True) -> tuple[Settings, tuple]:
    """An experiment's settings (config.yaml + flags, as parse_config) as one Settings, and the instances of
    `extra_groups` (options of one command, e.g. the planner's MachineArguments) parsed from the same flags."""
    parsed, config_path, _ = parse_config(argv, (*DATACLASSES, *extra_groups), check_this_machine=check_this_machine)
    count = len(DATACLASSES)
    return Settings.from_groups(parsed[:count], config_path), parsed[count:]


@contextlib.contextmanager
def _hardware_checks(on: bool):
    """TrainingArguments refuses bf16 where this machine has no bf16 GPU, and sets up this process's device (on a
    GPU machine: a CUDA context on GPU 0). Off, it is told a bf16 GPU is there and sees none to set up, so checking
    settings in a launcher or planner process neither fails on a laptop nor touches the GPUs training will use."""
    if on:
        yield
        return
    import torch
    from transformers import training_args

    with mock.patch.object(training_args, "is_torch_bf16_gpu_available", lambda *_args, **_kwargs: True), \
            mock.patch.object(torch.cuda, "is_available", lambda: False):
        yield


SECRET_SETTINGS = frozenset({"hub_token"})  # never written to the run directory or W&B


def resolved_config(*args) -> dict[str, Any]:
    """Every setting's final value, flat, as a config.yaml would hold it (for the run directory and W&B), secrets
    left out."""
    out: dict[str, Any] = {}
    for obj in args:
        for f in dataclasses.fields(obj):
            if f.name in SECRET_SETTINGS:
                continue
            value = getattr(obj, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, (str, int, float, bool, type(None), list, dict)):
                out[f.name] = value
            else:
                out[f.name] = str(value)
    return out


def _check(ok: bool, setting: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"setting '{setting}' = {value!r}: {fix}")


def validate_data(data: DataArguments, need_train: bool = True, files_at_hand: bool = True) -> None:
    """The data settings; files_at_hand=False (a plan printed away from the cluster) leaves out whether the files
    exist, which the plan reports instead."""
    files = [("validation_file", data.validation_file)]
    if need_train:
        files.insert(0, ("train_file", data.train_file))
    for name, path in files:
        _check(path is not None, name, path, "set it to a .jsonl, .json or .parquet file of records.")
        _check(Path(path).suffix in DATA_SUFFIXES, name, path, f"use one of {', '.join(DATA_SUFFIXES)}.")
        _check(not files_at_hand or Path(path).is_file(), name, path, "file not found; check the path (relative "
               "paths start at the directory you launch from, the repository root for launchers).")
    _check(data.max_seq_length > 0, "max_seq_length", data.max_seq_length, "use a positive number of tokens.")
    _check(data.document_field != data.summary_field, "summary_field", data.summary_field,
           "must differ from document_field.")
    for name in ("max_train_samples", "max_eval_samples", "pad_to_multiple_of", "preprocessing_num_workers"):
        value = getattr(data, name)
        _check(value is None or value > 0, name, value, "use a positive integer or leave it unset.")


def validate_chat_template(model: ModelArguments) -> None:
    """chat_template names a readable file (training and evaluation both check it before anything is loaded)."""
    path = model.chat_template
    if path is not None:
        _check(Path(path).is_file(), "chat_template", path,
               "file not found; give the .jinja file's path from the repository root (where the launchers run), or "
               "leave it unset to use the tokenizer's own template.")


def validate_generation(gen: GenerationArguments) -> None:
    """The generation settings (training validates them too, so a bad value stops the run before, not after)."""
    _check(gen.max_new_tokens > 0, "max_new_tokens", gen.max_new_tokens, "use a positive number of tokens.")
    _check(gen.generation_batch_size > 0, "generation_batch_size", gen.generation_batch_size, "use 1 or more.")


def validate_memory(memory: MemoryArguments, training: TrainingArguments) -> None:
    """The memory switches against the training setup (also used by the memory planner)."""
    _check(memory.tiled_mlp_tile_tokens > 0, "tiled_mlp_tile_tokens", memory.tiled_mlp_tile_tokens,
           "use a positive number of tokens, e.g. 8192.")
    kwargs = training.activation_checkpointing_kwargs
    if isinstance(kwargs, dict) and "offload" in kwargs:
        _check(False, "activation_checkpointing_kwargs", kwargs,
               "remove 'offload' and set offload_activations: true|false instead (one switch, one name).")
    if memory.offload_activations:
        _check(bool(training.activation_checkpointing), "offload_activations", True,
               "it offloads the inputs kept by activation checkpointing; set activation_checkpointing: true too.")
    if memory.tiled_mlp:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        deepspeed = bool(training.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        _check(processes == 1 or deepspeed, "tiled_mlp", True,
               f"with {processes} processes and no DeepSpeed, DDP would reduce the MLP's LoRA gradients once per "
               f"tile and stop; train under DeepSpeed ZeRO (USE_DEEPSPEED=1, the launcher's default for several "
               f"processes) or set tiled_mlp: false.")


def deepspeed_zero_settings(training: TrainingArguments) -> dict | None:
    """The zero_optimization section of the DeepSpeed config in use ({} when it has none), None when DeepSpeed is
    off or its config cannot be read (the `deepspeed` file check reports that)."""
    configured = training.deepspeed
    if isinstance(configured, str) and Path(configured).is_file():
        try:
            configured = json.loads(Path(configured).read_text(encoding="utf-8"))
        except ValueError as err:
            raise ConfigError(f"setting 'deepspeed' = {training.deepspeed!r}: not valid JSON: {err}") from err
    return configured.get("zero_optimization", {}) if isinstance(configured, dict) else None


def validate_sequence_parallel(memory: MemoryArguments, model: ModelArguments, data: DataArguments,
                               world_size: int | None, zero: dict | None, deepspeed: str | None = None,
                               architecture=None) -> None:
    """sequence_parallel_size against the launch (world_size: processes of the whole job; None: not known here, e.g.
    a plan printed away from the cluster), DeepSpeed (`zero`: the zero_optimization section of the config named
    `deepspeed`, None: DeepSpeed off), the attention, the padding and the model's heads (`architecture`:
    longctx.model.architecture.Architecture, None when it cannot be read offline). The planner calls it too."""
    sp = memory.sequence_parallel_size
    _check(sp >= 1, "sequence_parallel_size", sp, "use 1 (off) or the number of GPUs that share one sample.")
    if sp == 1:
        return
    if world_size is not None:
        _check(world_size % sp == 0, "sequence_parallel_size", sp,
               f"the launch has {world_size} processes (NUM_PROCESSES x NUM_MACHINES), not a multiple of {sp}; "
               f"launch a multiple of {sp} processes, or set sequence_parallel_size to a divisor of {world_size}.")
    _check(zero is not None, "sequence_parallel_size", sp, "it needs DeepSpeed (Ulysses sequence parallelism is "
           "DeepSpeed's); launch with USE_DEEPSPEED=1 (the launcher's default for several processes) or set "
           "sequence_parallel_size: 1.")
    stage = int(zero.get("stage", 0))
    _check(1 <= stage <= 3, "sequence_parallel_size", sp,
           f"it needs ZeRO stage 1, 2 or 3 and {deepspeed} sets stage {stage} (stage 0 crashes under "
           f"sequence parallelism, DeepSpeed issue #7833); use the experiment's ds_config_zero2.json.")
    # ZeRO 3 divides the summed gradients by the world size on its reduce-scatter path (the trainer scales the loss
    # for that); without it, by world / sp on some buckets and by world on others: no one loss scale is right
    _check(stage != 3 or zero.get("reduce_scatter", True) is True, "sequence_parallel_size", sp,
           f"under ZeRO stage 3 it needs reduce_scatter: true (DeepSpeed's default) in {deepspeed}'s "
           f"zero_optimization; remove reduce_scatter: false there.")
    _check(model.attn_implementation != "eager", "attn_implementation", "eager",
           f"sequence parallelism (sequence_parallel_size {sp}) works with sdpa or flash_attention_2 (eager needs a "
           f"seq x seq mask the Ulysses attention drops); use auto.")
    _check(data.pad_to_multiple_of is None or data.pad_to_multiple_of % sp == 0, "pad_to_multiple_of",
           data.pad_to_multiple_of, f"every batch is cut into sequence_parallel_size = {sp} equal slices; use a "
           f"multiple of {sp}, or leave it unset (batches are then padded to a multiple of {sp}).")
    if architecture is not None:
        heads, kv = architecture.num_attention_heads, architecture.num_key_value_heads
        _check(heads % sp == 0 and (kv % sp == 0 or sp % kv == 0), "sequence_parallel_size", sp,
               f"{model.model_name_or_path} has {heads} attention heads and {kv} KV heads; each of the {sp} GPUs "
               f"of a sample attends with heads / {sp} of them, so both must divide by it (or {sp} by the KV heads, "
               f"which are then replicated): use one of {architecture.sp_sizes()}.")


# A boolean (batch, 1, seq, seq) mask above this many bytes is refused: at 1 GiB a padded batch of 2 prompts is about
# 23,000 tokens long, far below long context, and the mask also keeps SDPA off its flash kernel.
ATTENTION_MASK_LIMIT_BYTES = 2**30


def validate_attention_masks(model: ModelArguments, data: DataArguments, gen: GenerationArguments) -> None:
    """Settings that would build a seq x seq attention mask at long context. Training never does: its batches are
    padded on the right, which causal attention never looks at, so the loss passes position_ids and no mask
    (longctx.loss). Generation pads prompts on the left, and with more than one prompt per batch transformers' SDPA
    attention then needs a (batch, 1, seq, seq) boolean mask, unless flash-attention (which takes the padding as
    sequence lengths) is in use: `auto` uses it when the flash_attn package is installed."""
    if gen.generation_batch_size == 1 or model.attn_implementation == "flash_attention_2":
        return
    if model.attn_implementation == "auto" and flash_attention_2_problem(need_cuda=False) is None:
        return
    tokens = data.max_seq_length + gen.max_new_tokens
    mask_bytes = gen.generation_batch_size * tokens ** 2
    _check(mask_bytes <= ATTENTION_MASK_LIMIT_BYTES, "generation_batch_size", gen.generation_batch_size,
           f"prompts are padded on the left, and without flash-attention transformers' SDPA attention then builds a "
           f"boolean mask of generation_batch_size x (max_seq_length + max_new_tokens)^2 = "
           f"{gen.generation_batch_size} x {tokens:,}^2 bytes = {mask_bytes / 2**30:.1f} GiB (the limit is 1 GiB); "
           f"set generation_batch_size: 1 (one prompt per batch needs no padding and no mask), or install flash-attn "
           f"(pip install flash-attn --no-build-isolation) and use attn_implementation: auto or flash_attention_2.")


def validate_model(model: ModelArguments) -> None:
    """The model settings that can be checked without loading anything: a local model directory holds a model."""
    path = Path(model.model_name_or_path)
    _check(not path.is_dir() or (path / "config.json").is_file(), "model_name_or_path", model.model_name_or_path,
           "this directory holds no model (no config.json); point it at a model directory (config.json, weights, "
           "tokenizer) or a hub id.")
    if model.tokenizer_name_or_path and Path(model.tokenizer_name_or_path).is_dir():
        _check(any((Path(model.tokenizer_name_or_path) / name).is_file()
                   for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")),
               "tokenizer_name_or_path", model.tokenizer_name_or_path,
               "this directory holds no tokenizer (no tokenizer.json or tokenizer_config.json); point it at one.")
    _check(model.rope_yarn_factor is None or model.rope_yarn_factor > 1, "rope_yarn_factor", model.rope_yarn_factor,
           "use a factor above 1 (4.0 takes 262,144 positions to 1,048,576), or leave it unset.")


def validate_training(training: TrainingArguments) -> None:
    """What the Trainer, the optimizer or the scheduler would reject only after the weights are loaded."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _check(getattr(training, name) >= 1, name, getattr(training, name), "use 1 or more.")
    _check(math.isfinite(training.learning_rate) and training.learning_rate > 0, "learning_rate",
           training.learning_rate, "use a positive learning rate, e.g. 1e-4 (LoRA at long context: 1e-4 to 2e-4).")
    _check(training.weight_decay >= 0, "weight_decay", training.weight_decay, "use 0 or more.")
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(training, name) < 1, name, getattr(training, name), "use a value in [0, 1), e.g. 0.9.")
    _check(training.adam_epsilon >= 0, "adam_epsilon", training.adam_epsilon, "use a small positive value, e.g. 1e-8.")
    _check(training.max_grad_norm >= 0, "max_grad_norm", training.max_grad_norm, "use 0 (no clipping) or more.")
    _check(training.max_steps == -1 or training.max_steps > 0, "max_steps", training.max_steps,
           "use a positive number of optimizer steps, or -1 to train num_train_epochs.")
    if training.max_steps == -1:
        _check(training.num_train_epochs > 0, "num_train_epochs", training.num_train_epochs,
               "use a positive number of epochs, or set max_steps.")
    for name, strategy in (("save_steps", training.save_strategy), ("eval_steps", training.eval_strategy)):
        value = getattr(training, name)
        if str(getattr(strategy, "value", strategy)) == "steps" and value is not None:
            _check(value > 0, name, value, "use a positive number of steps, or a fraction of the run below 1.")
    _check(training.save_total_limit is None or training.save_total_limit >= 1, "save_total_limit",
           training.save_total_limit, "use 1 or more, or leave it unset to keep every checkpoint.")
    _check(training.dataloader_num_workers >= 0, "dataloader_num_workers", training.dataloader_num_workers,
           "use 0 (the main process) or more.")
    _check(0 <= training.seed < 2**32, "seed", training.seed, "use a whole number in [0, 2^32).")
    _check(training.ddp_timeout > 0, "ddp_timeout", training.ddp_timeout, "use a positive number of seconds.")


def validate_run(run: RunArguments, data: DataArguments, plan: PlanArguments) -> None:
    """The run, data-field and plan settings no other check covers."""
    for name in ("document_field", "summary_field", "id_field"):
        _check(bool(getattr(data, name).strip()), name, getattr(data, name), "name a field of the records.")
    if data.datasets_cache_dir:
        ancestor = Path(data.datasets_cache_dir)
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        _check(ancestor.is_dir() and os.access(ancestor, os.W_OK), "datasets_cache_dir", data.datasets_cache_dir,
               "it cannot be created here; use a writable directory (on the shared filesystem with several machines).")
    _check(run.save_every_minutes is None or run.save_every_minutes > 0, "save_every_minutes",
           run.save_every_minutes, "use a positive number of minutes, or leave it unset.")
    for name in ("plan_gpus", "plan_validation_records", "plan_train_records", "plan_tokens_per_sample"):
        value = getattr(plan, name)
        _check(value is None or value >= 1, name, value, "use 1 or more, or leave it unset.")
    _check(plan.plan_gpu_peak_tflops > 0, "plan_gpu_peak_tflops", plan.plan_gpu_peak_tflops,
           "use the GPU's peak dense bf16 TFLOP/s, e.g. 989 (H100).")
    _check(plan.plan_mfu is None or 0 < plan.plan_mfu <= 1, "plan_mfu", plan.plan_mfu,
           "use a share of the peak in (0, 1], e.g. 0.35, or leave it unset.")


def validate(settings: Settings, files_at_hand: bool = True, world_size: int | None = None,
             architecture=None) -> None:
    """Every check that can run before weights, data or process groups are touched. world_size: processes of the
    whole job (None: not known, e.g. PLAN=1 on a laptop); architecture: the model's shape
    (longctx.model.architecture.readable_architecture; None when it cannot be read offline: then DeepSpeed checks
    sequence parallelism's heads when the model is prepared)."""
    model, data, lora, memory = settings.model, settings.data, settings.lora, settings.memory
    run, generation, training = settings.run, settings.generation, settings.training
    validate_model(model)
    validate_data(data, files_at_hand=files_at_hand)
    validate_chat_template(model)
    validate_memory(memory, training)
    validate_training(training)
    validate_run(run, data, settings.plan)
    _check(lora.lora_r > 0, "lora_r", lora.lora_r, "use a positive rank such as 8, 16 or 64.")
    _check(lora.lora_alpha > 0, "lora_alpha", lora.lora_alpha, "use a positive value, typically 2 x lora_r.")
    _check(0.0 <= lora.lora_dropout < 1.0, "lora_dropout", lora.lora_dropout, "use a value in [0, 1).")
    _check(len(lora.lora_target_modules) > 0, "lora_target_modules", lora.lora_target_modules,
           "name at least one module, e.g. [q_proj, v_proj], or 'all-linear'.")
    validate_generation(generation)
    validate_attention_masks(model, data, generation)
    for name in ("watchdog_timeout_seconds", "step_timeout_seconds"):
        value = getattr(run, name)
        _check(value is None or value > 0, name, value, "use a positive number of seconds, or leave it unset.")
    if training.do_eval or str(training.eval_strategy) not in ("no", "IntervalStrategy.NO"):
        _check(training.prediction_loss_only, "prediction_loss_only", training.prediction_loss_only,
               "set it to true: evaluation during training computes the loss only; gathering full-vocabulary "
               "logits of long samples would need tens of GiB. ROUGE runs afterwards (eval_all_checkpoints.sh).")
    _check(not training.load_best_model_at_end, "load_best_model_at_end", training.load_best_model_at_end,
           "set it to false: eval_all_checkpoints.sh picks the best checkpoint by ROUGE after training.")
    if model.attn_implementation == "eager":
        _check(data.max_seq_length <= 8192, "attn_implementation", "eager",
               "eager attention materialises seq x seq scores; use auto or sdpa above 8192 tokens.")
    if training.report_to and "wandb" in training.report_to:
        if importlib.util.find_spec("wandb") is None:  # found, not imported: importing it takes a second
            raise ConfigError("setting 'report_to' includes wandb but wandb is not installed: "
                              "pip install -r requirements.txt, or set report_to: none.")
    if training.deepspeed and isinstance(training.deepspeed, str):
        _check(Path(training.deepspeed).is_file(), "deepspeed", training.deepspeed,
               "file not found; point it at the experiment's ds_config_zero2.json.")
    if memory.sequence_parallel_size != 1 and world_size is not None:  # a plan away from the cluster: the planner
        # checks it against the DeepSpeed config the GPUs would get (longctx.planner.runplan)
        validate_sequence_parallel(memory, model, data, world_size, deepspeed_zero_settings(training),
                                   training.deepspeed, architecture)
