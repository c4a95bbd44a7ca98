"""The evaluation plan (eval_checkpoint.py / eval_all_checkpoints.sh): what one GPU holds while generating from the
longest validation prompt, how long scoring one checkpoint takes, and the refusals that belong before any weights
load.

Memory per GPU, for generation_batch_size rows of the longest prompt (P tokens) + max_new_tokens (M):
  weights            base parameters x weight bytes, + one adapter (adapters are swapped, never stacked)
  KV cache           layers x 2 (K, V) x KV heads x head_dim x 2 bytes x (P + M) x rows
  KV cache growth    one layer's K and V again, while transformers' DynamicCache concatenates a step's to them
  prefill working    the residual stream (hidden in, normed input) + the larger of the attention projections
                     (q, k, v, output, q / k norms in fp32) and the MLP at its peak, inside up_proj's LoRA path:
                     act + up_proj's base output + its LoRA update (scaling x B(A(x))) + their sum, the update and
                     the sum in the adapter's dtype (the base's: evaluation loads adapters without peft's fp32
                     upcast, which at 262,144 tokens would add 12 GiB: an fp32 update, an fp32 sum, an fp32 copy of
                     the input), for all P x rows tokens at once: O(tokens) with flash-attention or SDPA (no seq x seq
                     matrix; a padded batch under SDPA adds its rows x P x P boolean mask)
  framework          CUDA context and kernels
In-training evaluation (Trainer.evaluate every eval_steps: the eval loss, prediction_loss_only), per GPU, for
per_device_eval_batch_size rows of the longest validation sample: sequence parallelism is off in evaluation, so each
GPU runs whole samples even where training splits them:
  weights, LoRA + optimizer, framework    as in the training step (the optimizer's state stays through evaluation)
  forward working set  the prefill working set above (no KV cache: the loss runs without one), the MLP for one tile
                       with tiled_mlp (its input and output whole)
  logits               label positions x vocabulary x (logits + fp32 copy + fp32 log-softmax), after the layers
Time per checkpoint: every prompt's prefill (its forward FLOPs) + up to M greedy decode steps (each reads the
weights and the KV cache), in batches sorted by length, spread over the evaluation GPUs (longctx.planner.flops).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..model.architecture import Architecture
from .estimate import CUDA_CONTEXT_BYTES, GIB, MemoryEstimate, Part, framework_part, human_bytes
from .flops import decode_seconds, forward_flops, human_duration, kv_bytes_per_token


@dataclass
class EvalMemory:
    parts: list[Part]

    @property
    def peak_bytes(self) -> float:
        return sum(p.bytes for p in self.parts)


def evaluation_memory(arch: Architecture, longest_prompt: int, max_new_tokens: int, batch: int = 1,
                      weight_bytes: int = 2, lora_params: int = 0, flash_attention: bool = True,
                      adapter_bytes: int | None = None) -> EvalMemory:
    """Per-GPU memory at the end of the longest batch's prefill, with its cache sized for the whole generation.
    adapter_bytes: the LoRA weights' dtype size; None: the base's (how evaluation loads them)."""
    b = 2  # bf16 activations and cache
    context = longest_prompt + max_new_tokens
    kv_token = kv_bytes_per_token(arch)
    kv = kv_token * context * batch
    growth = kv_token // arch.num_hidden_layers * context * batch
    residual, attention, mlp = forward_bytes_per_token(arch, b, adapter_bytes or weight_bytes)
    rows = longest_prompt * batch
    working = rows * (residual + max(attention, mlp))
    mask = 0 if flash_attention or batch == 1 else batch * longest_prompt ** 2
    parts = [
        Part("weights", arch.num_parameters() * weight_bytes + lora_params * weight_bytes,
             f"{arch.num_parameters() / 1e9:.2f} B parameters x {weight_bytes} bytes + one adapter"),
        Part("KV cache", kv, f"{arch.num_hidden_layers} layers x 2 x {arch.num_key_value_heads} KV heads x "
                             f"{arch.head_dim} x 2 bytes x {context:,} tokens x {batch} row(s)"),
        Part("KV cache growth", growth, "one layer's K and V copied while DynamicCache concatenates a step"),
        Part("prefill working set", working + mask,
             f"{rows:,} tokens x {(residual + max(attention, mlp)):,} bytes (residual + "
             + ("MLP: act, up_proj, its LoRA update and their sum" if mlp >= attention else "attention") + ")"
             + (f" + the padded batch's {batch} x {longest_prompt:,}^2 boolean mask under SDPA" if mask else "")),
        Part("framework", CUDA_CONTEXT_BYTES, "CUDA context and kernels"),
    ]
    return EvalMemory(parts)


def forward_bytes_per_token(arch: Architecture, b: int, adapter_bytes: int) -> tuple[int, int, int]:
    """Bytes per token of one decoder layer's forward without autograd, b bytes per activation: (the residual stream:
    hidden in + normed input, the attention projections at their peak: q, k, v, output + q / k norms in fp32, the
    MLP at its peak inside up_proj's LoRA path: act + up_proj's base output (b), its LoRA update and their sum
    (the adapter's dtype), + an input copy when the dtypes differ)."""
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv_width = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    attention = (2 * q + 2 * kv_width) * b + (q + kv_width) * 4
    a = adapter_bytes
    mlp = 2 * i * b + i * a + i * max(a, b) + (h * a if a != b else 0)
    return 2 * h * b, attention, mlp


def training_evaluation_memory(step: MemoryEstimate, tokens: int, batch: int, labels: int) -> MemoryEstimate:
    """The in-training evaluation forward per GPU (module docstring) beside the training step `step` (its shape and
    held state): `batch` rows of `tokens` (the longest validation sample, padded as the collator pads it), `labels`
    label positions per row."""
    s, b = step.shape, step.shape.act_bytes
    residual, attention, mlp = forward_bytes_per_token(s.arch, b, 4 if s.lora_params_fp32 else s.weight_bytes)
    rows = tokens * batch
    tiled = s.tiled_mlp and tokens > s.tile_tokens
    tile = math.ceil(tokens / math.ceil(tokens / s.tile_tokens))
    # tiled: the MLP's input and output whole (counted in the residual, + the output), its inside for one tile
    mlp_bytes = s.arch.hidden_size * b * rows + mlp * tile * batch if tiled else mlp * rows
    working = rows * residual + max(attention * rows, mlp_bytes)
    which = ("attention: q, k, v, output, q / k norms in fp32" if attention * rows >= mlp_bytes else
             "MLP: act, up_proj, its LoRA update and their sum" + (f", one {tile:,}-token tile" if tiled else ""))
    logits = Part("logits at label positions", labels * batch * s.arch.vocab_size * (b + 8),
                  f"{labels * batch:,} positions x {s.arch.vocab_size:,} vocabulary, forward only")
    forward = Part("forward working set", working,
                   f"one layer at a time: {rows:,} tokens x {residual:,} bytes residual + its larger part ({which})")
    held = {p.name: p for p in step.held}
    return MemoryEstimate(
        s.replace(tokens=rows, sp_size=1),
        [held["weights"], Part("LoRA + optimizer", held["LoRA + optimizer"].bytes, "kept through evaluation"),
         framework_part(s, max(working, logits.bytes))],
        [logits, forward])


def evaluation_seconds(arch: Architecture, prompt_tokens: Sequence[int], max_new_tokens: int, batch: int, gpus: int,
                       flops_per_second: float, weight_bytes: int = 2, lora_params: int = 0) -> float:
    """Scoring one checkpoint: batches of `batch` prompts sorted by length (longest first), each padded to its
    longest; prefill + up to max_new_tokens decode steps per batch; the batches spread over `gpus`."""
    ordered = sorted(prompt_tokens, reverse=True)
    weights = arch.num_parameters() * weight_bytes
    total = 0.0
    for start in range(0, len(ordered), batch):
        rows, longest = len(ordered[start:start + batch]), ordered[start]
        total += rows * forward_flops(arch, longest, 1, lora_params) / flops_per_second
        total += decode_seconds(arch, longest, max_new_tokens, rows, weights, flops_per_second)
    batches = math.ceil(len(ordered) / batch)
    return total * math.ceil(batches / gpus) / batches if batches else 0.0


def check_context_length(arch: Architecture, longest_prompt: int, max_new_tokens: int, where: str = "") -> None:
    """Refuse before loading weights a generation that would run past the positions the model was trained for
    (its rotary embedding beyond max_position_embeddings is untrained: the summary would be garbage)."""
    limit = arch.max_position_embeddings
    if limit is None or longest_prompt + max_new_tokens <= limit:
        return
    raise ConfigError(
        f"setting 'max_new_tokens' = {max_new_tokens}: the longest validation prompt{where} has {longest_prompt:,} "
        f"tokens, and {longest_prompt:,} + {max_new_tokens} = {longest_prompt + max_new_tokens:,} exceeds the "
        f"model's max_position_embeddings ({limit:,}); lower max_new_tokens to {limit - longest_prompt} or less, or "
        f"leave the longest prompts out (max_seq_length with length_policy: drop, or truncate_document).")


def shared_gpus_warning(eval_gpus: Sequence[str], training_gpus: Sequence[str], same_machine: bool,
                        eval_peak_bytes: float | None = None) -> str | None:
    """--follow alongside training: a warning naming the GPUs both would use (None when they share none). GPUs
    are named as CUDA_VISIBLE_DEVICES names them (indices or UUIDs), on one machine."""
    shared = [gpu for gpu in eval_gpus if gpu in set(training_gpus)]
    if not same_machine or not shared:
        return None
    need = f" (scoring needs about {human_bytes(eval_peak_bytes)} per GPU)" if eval_peak_bytes else ""
    return (f"warning: --follow would score on GPU(s) {', '.join(shared)}, which the training run is using{need}: "
            f"both would slow down and either may run out of memory; give the evaluation other GPUs "
            f"(CUDA_VISIBLE_DEVICES) or score after training.")


def format_evaluation(memory: EvalMemory, gpu_memory_gib: float | None, seconds: float | None, prompts: int,
                      gpus: int, scorings: int, header: str) -> list[str]:
    """The evaluation lines of the run plan."""
    lines = [header]
    for p in memory.parts:
        lines.append(f"    {p.name:<22}{human_bytes(p.bytes):>11}   {p.note}")
    verdict = _verdict(memory.peak_bytes, gpu_memory_gib, "lower generation_batch_size or max_new_tokens")
    lines.append(f"    {'peak':<22}{human_bytes(memory.peak_bytes):>11}{verdict}")
    if seconds is not None:
        lines.append(f"  time: {prompts:,} prompts over {gpus} GPU(s): {human_duration(seconds)} per checkpoint"
                     + (f", {human_duration(seconds * scorings)} for {scorings} (the checkpoints + final_adapter)"
                        if scorings > 1 else ""))
    return lines


def format_training_evaluation(memory: MemoryEstimate, gpu_memory_gib: float | None, header: str,
                               advice: list[str]) -> list[str]:
    """The run plan's in-training evaluation section: its parts, its peak and its own verdict (with `advice` when it
    does not fit)."""
    lines = [header]
    peak_phase = memory.peak_phase
    for p in memory.held + memory.phases:
        mark = "  <- peak" if p is peak_phase else ""
        lines.append(f"    {p.name:<26}{human_bytes(p.bytes):>11}   {p.note}{mark}")
    verdict = _verdict(memory.peak_bytes, gpu_memory_gib, "; or ".join(advice))
    lines.append(f"    {'estimated peak':<26}{human_bytes(memory.peak_bytes):>11}{verdict}")
    return lines


def _verdict(peak_bytes: float, gpu_memory_gib: float | None, advice: str) -> str:
    """': fits in N GiB (... to spare)' or ': DOES NOT FIT in N GiB (over by ...): <advice>'; '' with no GPU."""
    if gpu_memory_gib is None:
        return ""
    room = gpu_memory_gib * GIB - peak_bytes
    if room >= 0:
        return f": fits in {gpu_memory_gib:g} GiB ({human_bytes(room)} to spare)"
    return f": DOES NOT FIT in {gpu_memory_gib:g} GiB (over by {human_bytes(-room)}): {advice}"
