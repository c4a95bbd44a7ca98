"""The planner's command line: the experiment's settings, parsed as training parses them, -> one estimate.

    python -m longctx.planner --config experiments/009_text_summary/config.yaml [--gpu_memory_gib 80] [--setting value]
    PLAN=1 bash experiments/009_text_summary/launch_train.sh          # the launcher runs it before every launch

The config and flags go through longctx.config.parse_config with training's own dataclasses (+ PlannerArguments),
so every setting, flag and typo is treated exactly as training treats it; only the bf16-GPU check of this machine is
left out (the plan is for the machine the settings are meant for). The architecture comes from a local model
directory's config.json, the local hub cache, or the experiment's model_architecture.json: nothing is downloaded.
Prints what one GPU holds at the peak of a step, whether that fits, and when it does not, which switch or value
would make it fit. Exit status: 0 fits (or not applicable: CPU), 3 does not fit, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import TrainingArguments

from ..config import ConfigError, build_parser, by_type, parse_config, validate_memory
from ..settings import DATACLASSES, DataArguments, GenerationArguments, LoraArguments, MemoryArguments, ModelArguments
from .advice import fits, format_estimate
from .architecture import ArchitectureError, load_architecture
from .estimate import LORA_MODULES, StepShape, estimate

EXIT_BAD_CONFIG = 2
EXIT_DOES_NOT_FIT = 3


@dataclass
class PlannerArguments:
    """Options of the planner only; every other setting is training's own."""

    gpu_memory_gib: float = field(
        default=80.0, metadata={"help": "Memory of one GPU in GiB (the launcher passes the real one; default: the "
                                        "80 GB H100 / A100 the reference experiment targets)."})
    num_gpus: int | None = field(
        default=None, metadata={"help": "GPUs in the ZeRO world (default: NUM_PROCESSES x NUM_MACHINES from the "
                                        "environment, else 4 for a DeepSpeed config, else 1)."})
    device: Literal["cuda", "cpu"] = field(
        default="cuda", metadata={"help": "cuda: plan for a GPU; cpu: print the breakdown, the limit does not apply."})
    label_tokens: int | None = field(
        default=None, metadata={"help": "Summary tokens per sample (logit rows); default: max_new_tokens."})
    experiment_dir: str | None = field(
        default=None, metadata={"help": "Folder with the model_architecture.json (used when the model's config.json "
                                        "cannot be read offline) and ds_config_zero2.json; default: the config's."})


PLANNER_DATACLASSES = (*DATACLASSES, PlannerArguments)


def _deepspeed_config(configured: str | dict | None, experiment_dir: Path | None,
                      device: str) -> tuple[dict[str, Any], str | None]:
    """The DeepSpeed config in use: the configured one, else the experiment's ds_config_zero2.json on GPUs (the
    launcher adds it there by default)."""
    if isinstance(configured, dict):
        return configured, "inline"
    candidate = configured
    if candidate is None and device == "cuda" and experiment_dir is not None:
        default = experiment_dir / "ds_config_zero2.json"
        candidate = str(default) if default.is_file() else None
    if candidate is None:
        return {}, None
    try:
        return json.loads(Path(candidate).read_text(encoding="utf-8")), candidate
    except (OSError, ValueError) as err:
        raise ConfigError(f"setting 'deepspeed' = {candidate!r}: cannot read it ({err}).") from err


def step_shape_from_settings(parsed, config_path: str | None) -> tuple[StepShape, PlannerArguments, int, str]:
    """(the step's shape on one GPU, the planner's options, tokens per sample, the title of the printout)."""
    args = by_type(parsed)
    model, data, lora = args[ModelArguments], args[DataArguments], args[LoraArguments]
    memory, gen, training, options = (args[MemoryArguments], args[GenerationArguments], args[TrainingArguments],
                                      args[PlannerArguments])
    validate_memory(memory, training)
    experiment_dir = (Path(options.experiment_dir) if options.experiment_dir
                      else Path(config_path).resolve().parent if config_path else None)
    arch = load_architecture(model.model_name_or_path, experiment_dir)
    ds, ds_path = _deepspeed_config(training.deepspeed, experiment_dir, options.device)
    zero_settings = ds.get("zero_optimization", {})
    zero = int(zero_settings.get("stage", 0))
    world = options.num_gpus
    if world is None:
        env = os.environ.get("NUM_PROCESSES")
        world = int(env) * int(os.environ.get("NUM_MACHINES", "1")) if env else (4 if zero else 1)
    bucket = zero_settings.get("reduce_bucket_size", 0)
    bucket = arch.hidden_size ** 2 if bucket == "auto" else int(float(bucket))  # DeepSpeed's "auto": hidden^2
    dtype = model.torch_dtype
    if dtype == "auto":
        dtype = "bfloat16" if options.device == "cuda" else "float32"
    weight_bytes = 4 if dtype == "float32" else 2
    act_bytes = 2 if (weight_bytes == 2 or training.bf16 or training.fp16) else 4
    attention = model.attn_implementation
    if attention == "auto":
        attention = "flash_attention_2/sdpa" if options.device == "cuda" else "sdpa"
    targets = tuple(LORA_MODULES if lora.lora_target_modules == ["all-linear"] else lora.lora_target_modules)
    batch = training.per_device_train_batch_size
    labels = options.label_tokens if options.label_tokens is not None else gen.max_new_tokens
    shape = StepShape(
        arch=arch, tokens=batch * data.max_seq_length, label_tokens=batch * labels, act_bytes=act_bytes,
        weight_bytes=weight_bytes, lora_r=lora.lora_r, lora_targets=targets, lora_dropout=lora.lora_dropout,
        checkpointing=bool(training.activation_checkpointing), offload=memory.offload_activations,
        tiled_mlp=memory.tiled_mlp, tile_tokens=memory.tiled_mlp_tile_tokens, attention=attention,
        device=options.device, world_size=world, zero_stage=zero, reduce_bucket_elements=bucket,
        lora_params_fp32=(zero == 0 and weight_bytes == 2),
    )
    where = "per GPU" if options.device == "cuda" else "per process (CPU)"
    title = (f"Memory plan {where} for {config_path or 'the command line'}: {model.model_name_or_path}, "
             f"{data.max_seq_length:,} tokens x {batch} per micro-batch"
             + (f" (DeepSpeed: {ds_path})" if ds_path else ""))
    return shape, options, data.max_seq_length, title


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The docstring as written above training's settings, each with its default."""


def print_help() -> None:
    parser = build_parser(PLANNER_DATACLASSES)
    parser.prog, parser.description, parser.formatter_class = "python -m longctx.planner", __doc__, _HelpFormatter
    parser.print_help()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    try:
        parsed, config_path, _ = parse_config(argv, PLANNER_DATACLASSES, check_this_machine=False)
        shape, options, tokens_per_sample, title = step_shape_from_settings(parsed, config_path)
    except (ConfigError, ArchitectureError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    memory = estimate(shape)
    limit = options.gpu_memory_gib if shape.device == "cuda" else None
    print(format_estimate(memory, limit, title, tokens_per_sample), flush=True)
    return EXIT_DOES_NOT_FIT if limit is not None and not fits(memory, limit) else 0
