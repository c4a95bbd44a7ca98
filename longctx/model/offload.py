"""Activation offload: the `offload_activations` switch.

    offload_activations: true    # config.yaml (MemoryArguments); needs activation_checkpointing: true

Mapped onto transformers' own switch, activation_checkpointing_kwargs {"offload": true}
(PreTrainedModel.activation_checkpointing_enable(offload=True) -> torch.autograd.graph.save_on_cpu around every
checkpointed layer): the layer inputs kept for the recompute live in pinned host memory and come back to the
accelerator for their layer's recompute. Merged into the existing kwargs (use_reentrant: false stays).
"""

from __future__ import annotations

import json
from typing import Any

import torch


def offload_checkpointing_kwargs(current: dict[str, Any] | str | None) -> dict[str, Any]:
    """activation_checkpointing_kwargs with offload on, every other key kept (use_reentrant: false by default, as
    transformers itself defaults to)."""
    if isinstance(current, str):  # TrainingArguments accepts a JSON string on the command line
        current = json.loads(current) if current.strip() else None
    merged = dict(current or {})
    merged.setdefault("use_reentrant", False)
    merged["offload"] = True
    return merged


def has_accelerator() -> bool:
    """Whether torch sees a device (CUDA, XPU, ...) whose memory the offload switch would relieve."""
    try:
        return torch.accelerator.current_accelerator() is not None
    except (AttributeError, RuntimeError):  # older torch
        return torch.cuda.is_available()


def enable_offload(training) -> str:
    """Switch offload on in TrainingArguments (before the Trainer exists); returns the line for the run log."""
    if not has_accelerator():
        # The activations already live in host memory, and transformers' save_on_cpu(pin_memory=True) cannot pin
        # without an accelerator ("no pinned memory allocator"): nothing to move, so nothing is switched on.
        return ("activation offload: requested, not applicable without an accelerator (activations already live "
                "in host memory); left off")
    kwargs = offload_checkpointing_kwargs(training.activation_checkpointing_kwargs)
    training.activation_checkpointing_kwargs = kwargs
    return f"activation offload: on (checkpointed layer inputs in pinned CPU memory; {kwargs})"
