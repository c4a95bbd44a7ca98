"""Whether an estimate fits one GPU, what would make it fit, and the text the command line prints.

Advice is found by estimating again with changed settings: the switches first (cheapest first: they keep the
sequence length), then the longest max_seq_length that fits with the current switches and with both memory
switches on.
"""

from __future__ import annotations

from typing import Any

from .estimate import GIB, MemoryEstimate, StepShape, estimate, human_bytes


def fits(memory: MemoryEstimate, gpu_memory_gib: float) -> bool:
    return memory.peak_bytes <= gpu_memory_gib * GIB


def _fits_with_tokens(s: StepShape, tokens: int, gpu_memory_gib: float) -> bool:
    return fits(estimate(s.replace(tokens=tokens, label_tokens=min(s.label_tokens, tokens))), gpu_memory_gib)


def largest_fitting_tokens(s: StepShape, gpu_memory_gib: float, step: int = 1024) -> int | None:
    """The longest micro-batch (a multiple of `step` tokens, at most s.tokens) that fits with these switches, or
    None when not even `step` tokens fit."""
    if not _fits_with_tokens(s, step, gpu_memory_gib):
        return None
    if fits(estimate(s), gpu_memory_gib):
        return s.tokens
    low, high = 1, max(1, s.tokens // step)
    while low < high:
        mid = (low + high + 1) // 2
        if _fits_with_tokens(s, mid * step, gpu_memory_gib):
            low = mid
        else:
            high = mid - 1
    return low * step


def suggestions(s: StepShape, gpu_memory_gib: float, tokens_per_sample: int) -> list[str]:
    """What would make a step that does not fit fit: switches first (cheapest first), then the sequence length."""
    out: list[str] = []
    options: list[tuple[str, dict[str, Any]]] = []
    if s.attention == "eager":
        options.append(("--attn_implementation auto", {"attention": "sdpa"}))
    if not s.checkpointing:
        options.append(("--activation_checkpointing true", {"checkpointing": True}))
    base = {"checkpointing": True, "attention": "sdpa" if s.attention == "eager" else s.attention}
    if not s.tiled_mlp:
        options.append(("--tiled_mlp true", {**base, "tiled_mlp": True}))
    if not s.offload:
        options.append(("--offload_activations true", {**base, "offload": True}))
    if not s.tiled_mlp and not s.offload:
        options.append(("--tiled_mlp true --offload_activations true", {**base, "tiled_mlp": True, "offload": True}))
    if s.lora_dropout > 0:
        options.append(("--lora_dropout 0.0 --tiled_mlp true --offload_activations true",
                        {**base, "tiled_mlp": True, "offload": True, "lora_dropout": 0.0}))
    for flags, change in options:
        changed = estimate(s.replace(**change))
        if fits(changed, gpu_memory_gib):
            out.append(f"{flags}  -> {human_bytes(changed.peak_bytes)}")
    wider = next((n for n in _sp_sizes(s) if n > s.sp_size
                  and fits(estimate(s.replace(tokens=s.tokens * s.sp_size // n, sp_size=n)), gpu_memory_gib)), None)
    if wider is not None:
        changed = estimate(s.replace(tokens=s.tokens * s.sp_size // wider, sp_size=wider))
        out.append(f"--sequence_parallel_size {wider}  -> {human_bytes(changed.peak_bytes)} (each sample over "
                   f"{wider} of the {s.world_size} GPUs)")
    batch = max(1, s.tokens * s.sp_size // max(1, tokens_per_sample))
    for label, change in (("with the current switches", {}),
                          ("with --tiled_mlp true --offload_activations true",
                           {**base, "tiled_mlp": True, "offload": True})):
        longest = largest_fitting_tokens(s.replace(**change), gpu_memory_gib)
        if longest is not None and longest * s.sp_size // batch < tokens_per_sample:
            out.append(f"--max_seq_length {longest * s.sp_size // batch // 1024 * 1024}  ({label})")
    return out


def _sp_sizes(s: StepShape) -> list[int]:
    """The sequence_parallel_size values this step could use: ones the heads allow that divide the GPUs, under
    DeepSpeed (Ulysses needs it)."""
    if s.zero_stage == 0:
        return []
    return [n for n in s.arch.sp_sizes() if s.world_size % n == 0]


def _verdict(memory: MemoryEstimate, gpu_memory_gib: float | None, tokens_per_sample: int) -> list[str]:
    s = memory.shape
    if s.device != "cuda" or gpu_memory_gib is None:
        return ["  verdict: CPU run, no GPU memory limit: the plan is not applicable (it does not block)."]
    if fits(memory, gpu_memory_gib):
        return [f"  verdict: fits in {gpu_memory_gib:g} GiB ({memory.peak_bytes / (gpu_memory_gib * GIB):.0%}, "
                f"{human_bytes(gpu_memory_gib * GIB - memory.peak_bytes)} to spare)."]
    lines = [f"  verdict: DOES NOT FIT in {gpu_memory_gib:g} GiB (over by "
             f"{human_bytes(memory.peak_bytes - gpu_memory_gib * GIB)})."]
    advice = suggestions(s, gpu_memory_gib, tokens_per_sample)
    if advice:
        return lines + ["  would fit with:"] + [f"    {a}" for a in advice]
    return lines + ["  nothing in this configuration makes it fit one GPU of this size; split each sample over more "
                    "GPUs (more GPUs and a larger sequence_parallel_size) or use a larger GPU."]


def format_estimate(memory: MemoryEstimate, gpu_memory_gib: float | None, title: str, tokens_per_sample: int) -> str:
    """The breakdown, the peak, and the verdict with advice when it does not fit."""
    s = memory.shape
    switches = (f"activation_checkpointing={str(s.checkpointing).lower()}, tiled_mlp={str(s.tiled_mlp).lower()}"
                + (f" ({s.tile_tokens}-token tiles)" if s.tiled_mlp else "")
                + f", offload_activations={str(s.offload).lower()}, lora_dropout={s.lora_dropout}")
    zero = f"DeepSpeed ZeRO-{s.zero_stage} over {s.world_size} GPU(s)" if s.zero_stage else "no DeepSpeed"
    tokens = (f"{s.tokens:,} tokens per GPU (each sample split over {s.sp_size} GPUs: sequence_parallel_size)"
              if s.sp_size > 1 else f"{s.tokens:,} tokens per micro-batch")
    lines = [title,
             f"  architecture: {s.arch.source}",
             f"  {tokens}, {'bf16/fp16' if s.act_bytes == 2 else 'fp32'} activations, "
             f"LoRA r={s.lora_r} on {len(s.lora_targets)} module types, {zero}, attention: {s.attention}",
             f"  {switches}",
             "  held through the step:"]
    width = 44
    for p in memory.held:
        lines.append(f"    {p.name:<{width}}{human_bytes(p.bytes):>11}   {p.note}")
    lines.append("  transient, one after another (the largest counts):")
    peak_phase = memory.peak_phase
    for p in memory.phases:
        mark = "  <- peak" if p is peak_phase else ""
        lines.append(f"    {p.name:<{width}}{human_bytes(p.bytes):>11}   {p.note}{mark}")
    lines.append(f"  {'estimated peak':<{width + 2}}{human_bytes(memory.peak_bytes):>11}")
    lines += [f"  note: {n}" for n in memory.notes]
    return "\n".join(lines + _verdict(memory, gpu_memory_gib, tokens_per_sample))
