"""Whether FlashAttention 2 can really be used here: decided by importing it, not by the package's presence.

A flash-attn wheel built for another torch is installed but fails at import ("undefined symbol"), and flash-attn-4
also installs a `flash_attn` package without FlashAttention 2's kernels: found by presence, either makes `auto` pick
flash_attention_2 and the model load fail, instead of falling back to PyTorch's SDPA. transformers'
is_flash_attn_2_available checks the distribution and its version, not that it imports; both are asked here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util


@functools.cache
def flash_attention_2_problem(need_cuda: bool = True) -> str | None:
    """Why flash_attention_2 cannot be used in this process, or None when it can (cached: asked once)."""
    import torch

    if need_cuda and not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    try:
        version = str(getattr(importlib.import_module("flash_attn"), "__version__", "unknown"))
    except Exception as err:  # noqa: BLE001 - any import failure means: not usable
        return f"flash_attn is installed but does not import ({_one_line(err)})"
    if not version.startswith("2."):
        return (f"flash_attn {version} is not FlashAttention 2 (flash-attn-4 installs a flash_attn package too); "
                f"install flash-attn 2 for flash_attention_2")
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401 - what transformers calls
    except Exception as err:  # noqa: BLE001
        return f"flash_attn {version} imports but lacks its kernels ({_one_line(err)})"
    if need_cuda:
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return f"transformers does not accept flash_attn {version} (it needs 2.3.3 or newer)"
    return None


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"
