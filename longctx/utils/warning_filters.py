"""Warnings from the stack that nobody running this project can act on, each silenced narrowly (its exact message)
at the entry points (training, evaluation), with the reason. Anything else still shows."""

from __future__ import annotations

import warnings

UNACTIONABLE = (
    # peft 0.21 reads transformers' deprecated model.is_gradient_checkpointing when it wraps a model or loads an adapter
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
    # DeepSpeed 0.19 ZeRO calls torch.distributed's deprecated all_gather_into_tensor
    (r"`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),
)


def silence_unactionable_warnings() -> None:
    for message, category in UNACTIONABLE:
        warnings.filterwarnings("ignore", message=message, category=category)
