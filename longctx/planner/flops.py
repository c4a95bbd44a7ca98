"""FLOPs of a training step, an evaluation forward, a prefill and a decode step, from the architecture alone, and
the seconds they take at an assumed (or measured) share of the GPU's peak.

Per sample of T tokens (N: the decoder layers' frozen linear weights; N_lora: adapter weights; L layers, H query
heads of width d; V vocabulary, h hidden; P label positions; a multiply-add is 2 FLOPs):
  forward              2 N T + 2 N_lora T + 2 L H d T^2 + 2 V h P
                       attention: QK^T and AV are 2 x 2 H d T^2 per layer for all pairs, half of it causal
  recomputed forward   2 N T + 2 N_lora T + 2 L H d T^2     activation checkpointing runs each layer's forward
                       again in the backward (the LM head is outside the checkpoints); tiled_mlp adds one more MLP
                       forward (2 N_mlp T): TiledMLP recomputes each tile in its own backward
  backward             2 N T + 4 N_lora T + 4 L H d T^2 + 2 V h P
                       frozen weights: only the input gradient (2 per weight and token); adapters: input and weight
                       gradients; attention: twice its forward
The forward + backward is benchmarks/gpu_long_context.py's model-FLOPs formula, T (4 N + 6 N_lora) + 6 L H d T^2
+ 4 V h P; the recomputation comes on top of it. At 262,144 tokens attention is over 90% of a Qwen3-4B step.

Seconds = FLOPs / (utilisation x peak FLOP/s), the utilisation counted on the FLOPs executed (recomputation
included). A decode step reads the weights and the KV cache once: it takes the longer of its FLOPs at that
utilisation and its bytes at the GPU's memory bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.architecture import Architecture

# Until docs/benchmarks.md holds a GPU measurement (benchmarks/gpu_long_context.py prints MFU on model FLOPs; the
# figure here is that MFU x executed / model FLOPs of the measured run), the utilisation is an assumption: the
# FlashAttention-3 paper (Shah et al., 2024) reports that FlashAttention-2 reaches about 35% of an H100's bf16 peak,
# and attention is over 90% of a long-context step's FLOPs.
MEASURED_MFU: float | None = None
MEASURED_MFU_SOURCE = ""
ASSUMED_MFU = 0.35
ASSUMED_MFU_SOURCE = ("assumed, not measured: FlashAttention-2 reaches about 35% of an H100's bf16 peak "
                      "(FlashAttention-3 paper); docs/benchmarks.md has no GPU measurement yet")
# H100 SXM HBM3: 3.35 TB/s; a decode step's reads reach about 70% of it (assumed).
DECODE_BYTES_PER_SECOND = 0.7 * 3.35e12


def default_mfu(configured: float | None) -> tuple[float, str]:
    """(utilisation, where it comes from): the setting, else the measured figure, else the stated assumption."""
    if configured is not None:
        return configured, "plan_mfu"
    if MEASURED_MFU is not None:
        return MEASURED_MFU, f"measured: {MEASURED_MFU_SOURCE}"
    return ASSUMED_MFU, ASSUMED_MFU_SOURCE


def linear_weights(arch: Architecture, modules: tuple[str, ...] | None = None) -> int:
    """The decoder layers' linear weights (all seven projections, or the named ones), every layer."""
    shapes = arch.linear_shapes()
    names = shapes if modules is None else modules
    return arch.num_hidden_layers * sum(shapes[m][0] * shapes[m][1] for m in names)


def causal_attention_flops(arch: Architecture, tokens: int) -> float:
    """QK^T and AV over the causal half of the T x T pairs, every layer: 2 L H d T^2."""
    return 2.0 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * tokens ** 2


@dataclass(frozen=True)
class TrainingFlops:
    forward: float
    recompute: float
    backward: float

    @property
    def model(self) -> float:
        """The benchmark's model FLOPs: forward + backward, no recomputation."""
        return self.forward + self.backward

    @property
    def executed(self) -> float:
        return self.forward + self.recompute + self.backward


def training_flops(arch: Architecture, tokens: int, label_tokens: int, lora_params: int, checkpointing: bool = True,
                   tiled_mlp: bool = False) -> TrainingFlops:
    """One sample (or micro-batch row) of `tokens` tokens, `label_tokens` of them predicted."""
    n, t = linear_weights(arch), float(tokens)
    attention = causal_attention_flops(arch, tokens)
    head = 2.0 * arch.vocab_size * arch.hidden_size * label_tokens
    layers_forward = 2 * n * t + 2 * lora_params * t + attention
    recompute = layers_forward if checkpointing else 0.0
    if tiled_mlp:
        recompute += 2 * linear_weights(arch, ("gate_proj", "up_proj", "down_proj")) * t
    return TrainingFlops(forward=layers_forward + head, recompute=recompute,
                         backward=2 * n * t + 4 * lora_params * t + 2 * attention + head)


def forward_flops(arch: Architecture, tokens: int, logit_rows: int, lora_params: int = 0) -> float:
    """One forward without gradients: the eval loss (logits at the label positions) or a prefill (one row)."""
    t = float(tokens)
    return (2 * linear_weights(arch) * t + 2 * lora_params * t + causal_attention_flops(arch, tokens)
            + 2.0 * arch.vocab_size * arch.hidden_size * logit_rows)


def kv_bytes_per_token(arch: Architecture, kv_bytes: int = 2) -> int:
    """Keys and values of one token, every layer: L x 2 x KV heads x d x bytes."""
    return arch.num_hidden_layers * 2 * arch.num_key_value_heads * arch.head_dim * kv_bytes


def decode_seconds(arch: Architecture, context: int, new_tokens: int, batch: int, weight_bytes: float,
                   flops_per_second: float, bytes_per_second: float = DECODE_BYTES_PER_SECOND) -> float:
    """Greedy decoding of `new_tokens` after a prompt of `context` tokens, `batch` rows at a time: each step reads
    the weights once and every row's KV cache (growing by one token a step), and computes 2 N + 4 L H d x context
    FLOPs per row (+ the LM head)."""
    n, kv = linear_weights(arch), kv_bytes_per_token(arch)
    per_context_token = 4.0 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim
    head = 2.0 * arch.vocab_size * arch.hidden_size
    # summed over the steps: the context grows from `context` to context + new_tokens - 1
    contexts = new_tokens * context + new_tokens * (new_tokens - 1) / 2
    flops = batch * (new_tokens * (2 * n + head) + per_context_token * contexts)
    read = new_tokens * weight_bytes + batch * kv * contexts
    return max(flops / flops_per_second, read / bytes_per_second)


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
