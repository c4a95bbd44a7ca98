"""The base model (attention backend, dtype, YaRN RoPE scaling) + LoRA + the long-context memory switches (tiled MLP,
activation offload), applied to the built model and TrainingArguments before the Trainer sees them. The tokenizer is
longctx.data.tokenizer's."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from ..errors import ConfigError
from ..settings import LoraArguments, MemoryArguments, ModelArguments
from ..utils.distributed import print0
from ..utils.flash_attention import flash_attention_2_problem
from .architecture import ARCHITECTURE_FILE
from .offload import enable_offload
from .tiling import enable_tiled_mlp


def resolve_attn_implementation(requested: str = "auto") -> str:
    """flash_attention_2 when flash_attn imports on CUDA (longctx.utils.flash_attention), else PyTorch SDPA
    (memory-efficient kernels, no seq x seq matrix on GPU). An explicit request is honoured; flash_attention_2 that
    cannot be used is a setting error naming why. When flash-attn is installed but unusable, `auto` says once why it
    falls back."""
    problem = flash_attention_2_problem()
    if requested == "auto":
        if problem and importlib.util.find_spec("flash_attn") is not None:
            _say_once(f"attention: flash_attention_2 not used ({problem}); using sdpa")
        return "sdpa" if problem else "flash_attention_2"
    if requested == "flash_attention_2" and problem:
        raise ConfigError(f"setting 'attn_implementation' = 'flash_attention_2': {problem}; install flash-attn 2 "
                          f"for this torch (pip install flash-attn --no-build-isolation), or use auto (sdpa).")
    return requested


@functools.cache
def _say_once(line: str) -> None:
    print0(line, file=sys.stderr)


def resolve_dtype(requested: str = "auto") -> torch.dtype:
    if requested == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, requested)


def apply_rope_yarn(config, factor: float | None) -> None:
    """YaRN RoPE scaling on a model config (transformers' rope_parameters, rope_type yarn): `factor` over the
    context the model was trained for, its max_position_embeddings, which becomes factor x that (so transformers'
    own check of the implied factor agrees). The base frequency (rope_theta) stays the model's."""
    if factor is None:
        return
    native = config.max_position_embeddings
    theta = (config.rope_parameters or {}).get("rope_theta", getattr(config, "rope_theta", None))
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": theta, "factor": float(factor),
                              "original_max_position_embeddings": native}
    config.max_position_embeddings = int(native * factor)


def load_base_model(model_args: ModelArguments, training: bool = True):
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = resolve_attn_implementation(model_args.attn_implementation)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    apply_rope_yarn(config, model_args.rope_yarn_factor)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        dtype=resolve_dtype(model_args.torch_dtype),
        attn_implementation=attn,
        trust_remote_code=model_args.trust_remote_code,
    )
    if training:
        model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model


def linear_layer_names(model: ModelArguments, experiment_dir: str | os.PathLike | None = None) -> set[str] | None:
    """The names of the model's linear layers (the last part of each module's name: q_proj, ..., lm_head), from a
    skeleton built on the meta device from its config: no weights, no memory. The config: a local directory's, the
    offline hub cache's, else the experiment's model_architecture.json when it names this model. None when none can
    be read here (then peft checks the targets when the weights are loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model.model_name_or_path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError):
        shipped = Path(experiment_dir or ".") / ARCHITECTURE_FILE
        values = json.loads(shipped.read_text(encoding="utf-8")) if shipped.is_file() else {}
        if values.get("model_name_or_path") != model.model_name_or_path or "model_type" not in values:
            return None
        values = {k: v for k, v in values.items() if not k.startswith("_") and k != "model_name_or_path"}
        config = AutoConfig.for_model(**values)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    return {name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)}


def check_lora_targets(lora: LoraArguments, model: ModelArguments, layers: set[str] | None) -> None:
    """Every lora_target_modules name is a linear layer of the model (peft would stop only after the weights load)."""
    targets = lora.lora_target_modules
    if layers is None or targets == ["all-linear"]:
        return
    missing = [name for name in targets if name not in layers]
    if missing:
        raise ConfigError(f"setting 'lora_target_modules' = {targets!r}: {missing[0]!r} is no linear layer of "
                          f"{model.model_name_or_path} (its linear layers: {', '.join(sorted(layers))}); name some of "
                          f"those, or 'all-linear'.")


def apply_lora(model, lora_args: LoraArguments):
    from peft import LoraConfig, TaskType, get_peft_model

    targets = lora_args.lora_target_modules
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
    )
    return get_peft_model(model, config)


def apply_memory_switches(model, memory: MemoryArguments, training) -> list[str]:
    """Apply MemoryArguments to the built (LoRA-wrapped) model and to the TrainingArguments the Trainer will get,
    before the Trainer exists. Returns one line per switch for the run log."""
    lines = []
    if memory.tiled_mlp:
        count = enable_tiled_mlp(model, memory.tiled_mlp_tile_tokens)
        lines.append(f"tiled MLP: on ({count} layers, tiles of {memory.tiled_mlp_tile_tokens} tokens, DeepSpeed "
                     f"TiledMLP; batches of at most {memory.tiled_mlp_tile_tokens} tokens run untiled)")
    else:
        lines.append("tiled MLP: off")
    lines.append(enable_offload(training) if memory.offload_activations else "activation offload: off")
    return lines
