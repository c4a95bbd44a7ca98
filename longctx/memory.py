"""Per-GPU memory plan of one training step, before anything is loaded or launched.

    python -m longctx.memory --config experiments/009_text_summary/config.yaml [--gpu_memory_gib 80] [--setting value]
    PLAN=1 bash experiments/009_text_summary/launch_train.sh          # the launcher runs it before every launch

Reads the experiment's config (the same keys and flags as training), the model architecture (a local model
directory's config.json, the local hub cache, or the experiment's model_architecture.json: nothing is downloaded)
and prints what one GPU holds at the peak of a step, whether that fits, and when it does not, which switch or value
would make it fit. Exit status: 0 fits (or not applicable: CPU), 3 does not fit, 2 bad configuration.

How each part is estimated (b = bytes per activation element, S = tokens per micro-batch; per-token counts are
what autograd saves for the backward in transformers' Qwen3/Llama decoder layer with PEFT LoRA, checked against
the tensors a real layer saves in tests/test_memory.py):
  weights                base parameters x weight bytes (tied embeddings counted once)
  LoRA + optimizer       adapter weights on every GPU; fp32 master, gradient and Adam moments split over the
                         ZeRO world (all on one GPU without DeepSpeed); ZeRO's reduce buckets go to framework
  checkpointed inputs    layers x S x hidden x b (what activation checkpointing keeps between forward and
                         backward), + the final norm's fp32 input; with offload_activations: host memory, and the
                         GPU keeps one layer's input in flight plus the one brought back for its recompute
  one layer's recompute  everything one decoder layer saves when its forward is recomputed in the backward (norm
                         inputs in fp32, q/k/v, attention output, MLP gate/act/up = 3 x intermediate, the adapters'
                         inputs or, with LoRA dropout, each adapter's dropped copy + mask), + the MLP's gradients and
                         kernel buffers (2 x intermediate, calibrated on CPU); tiled_mlp keeps the intermediate-sized
                         terms for one tile instead of S tokens
  attention              the attention backward's workspace: flash-attention's fp32 dq accumulator, dq/dk/dv and
                         (grouped-query) expanded dk/dv, all O(S); eager attention adds heads x S x S scores
  logits                 label positions x vocabulary x (fp32 log-softmax + its two gradient buffers, + the
                         gradient cast back to bf16)
  framework              CUDA context and kernels (1 GiB), NCCL (0.5 GiB with several GPUs), ZeRO reduce buckets,
                         and 5% allocator slack on the activations
The peak is: the held parts + the largest of the transient phases (the loss, one layer's recompute during its MLP
backward, or during its attention backward), which happen one after another, not together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
ARCHITECTURE_FILE = "model_architecture.json"
EXIT_DOES_NOT_FIT = 3
EXIT_BAD_CONFIG = 2
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CUDA_CONTEXT_BYTES = 1.0 * GIB     # context, cuBLAS / cuDNN workspaces, kernels: outside torch's allocator
NCCL_BYTES = 0.5 * GIB             # communicator buffers with more than one GPU
ALLOCATOR_SLACK = 0.05             # caching-allocator fragmentation, as a share of the activation memory


class PlanError(ValueError):
    """The plan cannot be made (architecture unknown, bad setting). The message says what to do."""


# --- architecture -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    source: str = ""

    @classmethod
    def from_config(cls, values: dict[str, Any], source: str = "") -> Architecture:
        try:
            hidden, heads = int(values["hidden_size"]), int(values["num_attention_heads"])
            return cls(
                hidden_size=hidden,
                num_hidden_layers=int(values["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(values.get("num_key_value_heads") or heads),
                head_dim=int(values.get("head_dim") or hidden // heads),
                intermediate_size=int(values["intermediate_size"]),
                vocab_size=int(values["vocab_size"]),
                tie_word_embeddings=bool(values.get("tie_word_embeddings", False)),
                source=source,
            )
        except KeyError as err:
            raise PlanError(f"{source}: model config has no '{err.args[0]}'; the planner needs hidden_size, "
                            f"num_hidden_layers, num_attention_heads, intermediate_size and vocab_size.") from err

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, q, kv, i = (self.hidden_size, self.num_attention_heads * self.head_dim,
                       self.num_key_value_heads * self.head_dim, self.intermediate_size)
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def num_parameters(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden_size + 2 * self.head_dim
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * per_layer + self.hidden_size


def load_architecture(model_name_or_path: str, experiment_dir: str | os.PathLike | None = None) -> Architecture:
    """A local directory's config.json; else the hub cache (offline, nothing downloaded); else the experiment's
    model_architecture.json when it describes this model."""
    local = Path(model_name_or_path) / "config.json"
    if local.is_file():
        return Architecture.from_config(json.loads(local.read_text(encoding="utf-8")), str(local))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_name_or_path, "config.json")
        if isinstance(cached, str) and Path(cached).is_file():
            return Architecture.from_config(json.loads(Path(cached).read_text(encoding="utf-8")), cached)
    except Exception:  # noqa: BLE001 - not a hub id, no cache: fall through to the shipped values
        pass
    if experiment_dir is not None:
        shipped = Path(experiment_dir) / ARCHITECTURE_FILE
        if shipped.is_file():
            values = json.loads(shipped.read_text(encoding="utf-8"))
            if values.get("model_name_or_path") == model_name_or_path:
                return Architecture.from_config(values, str(shipped))
    raise PlanError(f"setting 'model_name_or_path' = {model_name_or_path!r}: no config.json there, none in the local "
                    f"hub cache, and no {ARCHITECTURE_FILE} for it next to the config; download the model, or add "
                    f"{ARCHITECTURE_FILE} (its config.json values + \"model_name_or_path\") to the experiment.")


# --- what is planned --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything the estimate depends on."""

    arch: Architecture
    tokens: int                              # tokens per micro-batch on one GPU (batch x sequence)
    label_tokens: int                        # positions whose logits are computed (the summary; S for full logits)
    act_bytes: int = 2                       # activation element: 2 bf16/fp16, 4 fp32
    weight_bytes: int = 2
    lora_r: int = 16
    lora_targets: tuple[str, ...] = LORA_MODULES
    lora_dropout: float = 0.05
    checkpointing: bool = True
    offload: bool = False
    tiled_mlp: bool = False
    tile_tokens: int = 8192
    attention: str = "sdpa"                  # flash_attention_2 | sdpa | eager
    device: str = "cuda"                     # cuda | cpu
    world_size: int = 1
    zero_stage: int = 0                      # 0: no DeepSpeed
    reduce_bucket_elements: int = 0          # ZeRO reduce bucket (elements), 0 without DeepSpeed
    optimizer: bool = True                   # Adam moments + master weights (False: a bare forward + backward)
    lora_params_fp32: bool = False           # PEFT keeps adapters in fp32 unless DeepSpeed casts them

    def replace(self, **changes) -> Setup:
        return dataclasses.replace(self, **changes)


@dataclass
class Part:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    setup: Setup
    held: list[Part]                         # for the whole step, or from the forward to the backward
    phases: list[Part]                       # transient, one after another: the largest counts
    host_bytes: float = 0.0                  # pinned host memory per process (offload)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> Part:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak_bytes(self) -> float:
        return sum(p.bytes for p in self.held) + self.peak_phase.bytes

    def part(self, name: str) -> Part:
        return next(p for p in self.held + self.phases if p.name == name)

    @property
    def activation_bytes(self) -> float:
        """The peak without weights, LoRA + optimizer and framework: what grows with the sequence."""
        fixed = {"weights", "LoRA + optimizer", "framework"}
        return self.peak_bytes - sum(p.bytes for p in self.held if p.name in fixed)


def _lora_in_features(s: Setup, modules: tuple[str, ...]) -> list[int]:
    shapes = s.arch.linear_shapes()
    return [shapes[m][0] for m in modules if m in s.lora_targets]


def layer_saved_bytes_per_token(s: Setup) -> dict[str, float]:
    """Bytes per token one decoder layer saves for its backward, split into the attention half and the MLP half.

    The layer input itself is not included (activation checkpointing holds it). Frozen base linears save only
    their weight, so a projection's input is kept only by what else needs it. Per token, b = s.act_bytes:
      attention half: the input norm's fp32 copy (when b < 4), q/k norms' fp32 inputs, rotated q, k and v and the
        attention output (saved by the attention kernel; o_proj reads the same tensor), the fp32 residual feeding
        the post-attention norm, and per-row norm statistics;
      MLP half: gate (SiLU's input), act(gate) and up (the product's inputs): 3 x intermediate x b;
      LoRA, per adapter: the rank-r A output; without dropout A keeps its input, shared by the adapters reading the
        same tensor (q/k/v: the normed input; gate/up: the post-attention norm's output; down: the product); with
        dropout each adapter keeps its dropped copy (b) and the dropout mask (1 byte on GPU, b on CPU) instead.
      tiled_mlp: TiledMLP keeps the MLP input for its recompute (counted in the attention half, whole sequence).
    """
    a, b = s.arch, s.act_bytes
    q, kv, h, i = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim, a.hidden_size, \
        a.intermediate_size
    dropout = s.lora_dropout > 0
    mask = 1 if s.device == "cuda" else b
    targets = set(s.lora_targets)

    def adapters(names: tuple[str, ...], width: int, input_saved_anyway: bool = False) -> float:
        used = [n for n in names if n in targets]
        if not used:
            return 0
        if dropout:
            kept = len(used) * width * (b + mask)  # each adapter's dropped copy + mask
        else:
            kept = 0 if input_saved_anyway else width * b  # the shared input
        return len(used) * s.lora_r * b + kept

    attention = ((h * 4 if (b < 4 or not s.checkpointing) else 0)                 # input norm in fp32
                 + (q + kv) * 4 + (q + 2 * kv) * b + q * b + h * 4                # q/k norms, q k v, output, residual
                 + (2 * a.num_attention_heads + a.num_key_value_heads + 2) * 4    # norm statistics, softmax lse
                 + adapters(("q_proj", "k_proj", "v_proj"), h) + adapters(("o_proj",), q, input_saved_anyway=True))
    if s.tiled_mlp:
        attention += h * b  # the MLP input, kept by TiledMLP
    if s.attention == "eager":
        attention += a.num_attention_heads * s.tokens * (4 + b)  # softmax in fp32 + its cast: S x S per head
    mlp = 3 * i * b + adapters(("gate_proj", "up_proj"), h) + adapters(("down_proj",), i)
    return {"attention": attention, "mlp": mlp}


def mlp_transient_bytes_per_token(s: Setup) -> float:
    """What one MLP's recompute + backward adds to the saved tensors at its peak, per token of the tile:
      backward: two intermediate-sized gradients (d(act), d(up) while d(product) is alive), less what down_proj's
        adapter has freed by then (its kept input: the product, or the dropped copy + mask);
      forward (recompute) with dropout on down_proj: the product stays alive while the adapter makes its dropped
        copy and mask;
      + one intermediate-sized buffer inside the kernels.
    Calibrated on the CPU benchmark's model: the first two against a per-operator memory profile (exact), the
    kernel buffer against peak RSS (invisible to per-operator accounting)."""
    i, b = s.arch.intermediate_size, s.act_bytes
    dropout_on_down = s.lora_dropout > 0 and "down_proj" in s.lora_targets
    if "down_proj" not in s.lora_targets:
        down_kept = 0
    elif dropout_on_down:
        down_kept = i * (b + (1 if s.device == "cuda" else b))
    else:
        down_kept = i * b
    backward = max(0, 2 * i * b - down_kept)
    forward = i * b if dropout_on_down else 0
    return max(backward, forward) + i * b


def attention_workspace_bytes(s: Setup) -> float:
    """The attention backward's buffers for the whole sequence."""
    a, b, S = s.arch, s.act_bytes, s.tokens
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    grads = (q + 2 * kv) * b + q * b  # dq, dk, dv and the incoming d(output)
    if s.attention == "eager":
        return S * grads + S * a.num_attention_heads * S * (4 + b)
    if s.device == "cpu":
        return S * grads
    expanded = 2 * q * b if kv < q else 0  # flash-attention expands dk / dv to every query head, then sums
    return S * (grads + q * 4 + expanded)   # + the fp32 dq accumulator


def lora_parameter_count(s: Setup) -> int:
    shapes = s.arch.linear_shapes()
    per_layer = sum(s.lora_r * (shapes[m][0] + shapes[m][1]) for m in s.lora_targets if m in shapes)
    return per_layer * s.arch.num_hidden_layers


def estimate(s: Setup) -> Plan:
    a, b, S = s.arch, s.act_bytes, s.tokens
    h, layers = a.hidden_size, a.num_hidden_layers
    notes: list[str] = []

    weights = a.num_parameters() * s.weight_bytes
    lora = lora_parameter_count(s)
    param_bytes = 4 if (s.lora_params_fp32 or s.weight_bytes == 4) else s.weight_bytes
    if s.zero_stage >= 1:  # bf16 copy on every GPU; fp32 master + fp32 gradient + Adam m, v split over the world
        lora_bytes = lora * s.weight_bytes + lora * (4 + 4 + 8) / s.world_size
    else:  # adapter weights + gradients in their own dtype, Adam m, v in fp32
        lora_bytes = lora * (2 * param_bytes + (8 if s.optimizer else 0))

    saved = layer_saved_bytes_per_token(s)
    if s.tiled_mlp and S > s.tile_tokens:
        tile = math.ceil(S / math.ceil(S / s.tile_tokens))
        mlp_saved = saved["mlp"] * tile
        # TiledMLP's backward: d(input) for the whole sequence + one tile's saved tensors and gradients
        mlp_transient = S * h * b + tile * mlp_transient_bytes_per_token(s)
    else:
        mlp_saved = saved["mlp"] * S
        mlp_transient = S * mlp_transient_bytes_per_token(s)
    attention_saved = saved["attention"] * S
    incoming_grad = S * h * b  # d(hidden) arriving from the layer above

    if s.checkpointing:
        layer_inputs = layers * S * h * b + 2 * S * a.head_dim * b  # + rotary cos / sin, shared by the layers
        final_norm = S * h * 4
        host = layers * S * h * b if s.offload else 0.0  # the layer inputs (cos / sin arrive as kwargs: not packed)
        if s.offload and s.device == "cpu":
            held_activations = [Part("checkpointed layer inputs", layer_inputs + final_norm,
                                     f"{layers} layers x {fmt(S * h * b)} + final norm {fmt(final_norm)}; "
                                     f"offload on a CPU: the host is where they already are")]
        elif s.offload:
            on_gpu = 2 * S * h * b + 2 * S * a.head_dim * b        # one in flight + one back for its recompute
            held_activations = [Part("checkpointed layer inputs", on_gpu + final_norm,
                                     f"offloaded: {fmt(host)} in pinned host memory; on the GPU one layer's input "
                                     f"in flight + one back for its recompute, + final norm {fmt(final_norm)}")]
        else:
            held_activations = [Part("checkpointed layer inputs", layer_inputs + final_norm,
                                     f"{layers} layers x {fmt(S * h * b)} + final norm {fmt(final_norm)}")]
    else:
        host = 0.0
        other_layers = (layers - 1) * (attention_saved + mlp_saved + S * h * b)
        held_activations = [Part("saved activations of the other layers", other_layers + S * h * 4,
                                 "no activation checkpointing: every layer keeps what it saves")]
        if s.offload:
            notes.append("offload_activations needs activation_checkpointing: it offloads the checkpointed inputs.")

    recompute = Part("one layer's recompute (MLP backward)", attention_saved + mlp_saved + mlp_transient,
                     f"saved: attention {fmt(attention_saved)} + MLP {fmt(mlp_saved)}"
                     f"{' (one tile)' if s.tiled_mlp and S > s.tile_tokens else ''}; MLP gradients and buffers "
                     f"{fmt(mlp_transient)}")
    workspace = attention_workspace_bytes(s)
    attention = Part("one layer's recompute (attention backward)", attention_saved + workspace + incoming_grad,
                     f"saved attention {fmt(attention_saved)} + backward workspace {fmt(workspace)} ({s.attention}"
                     f"{', S x S scores' if s.attention == 'eager' else ', O(tokens)'})")
    # forward: logits (b) + fp32 copy + fp32 log-softmax; backward: log-softmax + d(log-softmax) + d(logits) in
    # fp32 (+ d(logits) cast back to b); the backward is the larger
    logits_per_row = a.vocab_size * (12 + (b if b < 4 else 0))
    logits = Part("logits at label positions", s.label_tokens * logits_per_row,
                  f"{s.label_tokens:,} positions x {a.vocab_size:,} vocabulary")

    activations = sum(p.bytes for p in held_activations) + max(recompute.bytes, attention.bytes, logits.bytes)
    if s.device == "cuda":
        buckets = 2 * s.reduce_bucket_elements * s.weight_bytes if s.zero_stage >= 1 else 0
        framework = (CUDA_CONTEXT_BYTES + (NCCL_BYTES if s.world_size > 1 else 0) + buckets
                     + ALLOCATOR_SLACK * activations)
        framework_note = (f"CUDA context {fmt(CUDA_CONTEXT_BYTES)}"
                          + (f", NCCL {fmt(NCCL_BYTES)}" if s.world_size > 1 else "")
                          + (f", ZeRO buckets {fmt(buckets)}" if buckets else "")
                          + f", allocator slack {ALLOCATOR_SLACK:.0%}")
    else:
        framework, framework_note = 0.0, "CPU: the process's own baseline (Python, libraries) is not modelled"

    count = a.num_parameters()
    count_text = f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.1f} M"
    held = [Part("weights", weights, f"{count_text} parameters x {s.weight_bytes} bytes"),
            Part("LoRA + optimizer", lora_bytes,
                 f"{lora / 1e6:.1f} M adapter parameters" + (f", ZeRO-{s.zero_stage} share of {s.world_size} GPUs"
                                                              if s.zero_stage else "")),
            Part("framework", framework, framework_note),
            *held_activations]
    return Plan(s, held, [logits, recompute, attention], host_bytes=host, notes=notes)


# --- advice -----------------------------------------------------------------------------------------------------


def fits(plan: Plan, gpu_memory_gib: float) -> bool:
    return plan.peak_bytes <= gpu_memory_gib * GIB


def largest_fitting_tokens(s: Setup, gpu_memory_gib: float, step: int = 1024) -> int | None:
    """The longest micro-batch (a multiple of `step` tokens) that fits with these switches, or None."""
    if not fits(estimate(s.replace(tokens=step, label_tokens=min(s.label_tokens, step))), gpu_memory_gib):
        return None
    low, high = 1, max(1, s.tokens // step)
    if fits(estimate(s), gpu_memory_gib):
        return s.tokens
    while low < high:
        mid = (low + high + 1) // 2
        if fits(estimate(s.replace(tokens=mid * step, label_tokens=min(s.label_tokens, mid * step))), gpu_memory_gib):
            low = mid
        else:
            high = mid - 1
    return low * step


def suggestions(s: Setup, gpu_memory_gib: float, tokens_per_sample: int) -> list[str]:
    """What would make a plan that does not fit fit: switches first (cheapest first), then the sequence length."""
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
        plan = estimate(s.replace(**change))
        if fits(plan, gpu_memory_gib):
            out.append(f"{flags}  -> {fmt(plan.peak_bytes)}")
    batch = max(1, s.tokens // max(1, tokens_per_sample))
    for label, change in (("with the current switches", {}),
                          ("with --tiled_mlp true --offload_activations true",
                           {**base, "tiled_mlp": True, "offload": True})):
        longest = largest_fitting_tokens(s.replace(**change), gpu_memory_gib)
        if longest is not None and longest // batch < tokens_per_sample:
            out.append(f"--max_seq_length {longest // batch // 1024 * 1024}  ({label})")
    return out


# --- text -------------------------------------------------------------------------------------------------------


def fmt(num_bytes: float) -> str:
    if 0 < abs(num_bytes) < 0.1 * GIB:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / GIB:.2f} GiB"


def format_plan(plan: Plan, gpu_memory_gib: float | None, title: str, tokens_per_sample: int) -> str:
    s = plan.setup
    switches = (f"activation_checkpointing={str(s.checkpointing).lower()}, tiled_mlp={str(s.tiled_mlp).lower()}"
                + (f" ({s.tile_tokens}-token tiles)" if s.tiled_mlp else "")
                + f", offload_activations={str(s.offload).lower()}, lora_dropout={s.lora_dropout}")
    zero = f"DeepSpeed ZeRO-{s.zero_stage} over {s.world_size} GPU(s)" if s.zero_stage else "no DeepSpeed"
    lines = [title,
             f"  architecture: {s.arch.source}",
             f"  {s.tokens:,} tokens per micro-batch, {'bf16/fp16' if s.act_bytes == 2 else 'fp32'} activations, "
             f"LoRA r={s.lora_r} on {len(s.lora_targets)} module types, {zero}, attention: {s.attention}",
             f"  {switches}",
             "  held through the step:"]
    width = 44
    for p in plan.held:
        lines.append(f"    {p.name:<{width}}{fmt(p.bytes):>11}   {p.note}")
    lines.append("  transient, one after another (the largest counts):")
    peak_phase = plan.peak_phase
    for p in plan.phases:
        mark = "  <- peak" if p is peak_phase else ""
        lines.append(f"    {p.name:<{width}}{fmt(p.bytes):>11}   {p.note}{mark}")
    lines.append(f"  {'estimated peak':<{width + 2}}{fmt(plan.peak_bytes):>11}")
    if plan.host_bytes and s.device == "cuda":
        lines.append(f"  host memory for offloaded activations: {fmt(plan.host_bytes)} pinned per GPU process "
                     f"(x the GPUs of one machine: {fmt(plan.host_bytes * s.world_size)} if all {s.world_size} share "
                     f"one)")
    lines += [f"  note: {n}" for n in plan.notes]
    if s.device != "cuda" or gpu_memory_gib is None:
        lines.append("  verdict: CPU run, no GPU memory limit: the plan is not applicable (it does not block).")
    elif fits(plan, gpu_memory_gib):
        lines.append(f"  verdict: fits in {gpu_memory_gib:g} GiB ({plan.peak_bytes / (gpu_memory_gib * GIB):.0%}, "
                     f"{fmt(gpu_memory_gib * GIB - plan.peak_bytes)} to spare).")
    else:
        lines.append(f"  verdict: DOES NOT FIT in {gpu_memory_gib:g} GiB (over by "
                     f"{fmt(plan.peak_bytes - gpu_memory_gib * GIB)}).")
        advice = suggestions(s, gpu_memory_gib, tokens_per_sample)
        if advice:
            lines.append("  would fit with:")
            lines += [f"    {a}" for a in advice]
        else:
            lines.append("  nothing in this configuration makes it fit one GPU of this size; shard the sequence "
                         "(Ulysses sequence parallelism) or use a larger GPU.")
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------------------


@dataclass
class PlanArguments:
    gpu_memory_gib: float = field(
        default=80.0, metadata={"help": "Memory of one GPU in GiB (the launcher passes the real one; default: the "
                                        "80 GB H100 / A100 the reference experiment targets)."})
    num_gpus: int | None = field(
        default=None, metadata={"help": "GPUs in the ZeRO world (default: NUM_PROCESSES x NUM_MACHINES from the "
                                        "environment, else 4 for a DeepSpeed config, else 1)."})
    device: str = field(
        default="cuda", metadata={"help": "cuda: plan for a GPU; cpu: print the breakdown, the limit does not apply."})
    label_tokens: int | None = field(
        default=None, metadata={"help": "Summary tokens per sample (logit rows); default: max_new_tokens."})
    experiment_dir: str | None = field(
        default=None, metadata={"help": "Folder with the model_architecture.json (used when the model's config.json "
                                        "cannot be read offline) and ds_config_zero2.json; default: the config's."})


@dataclass
class PlanTrainingArguments:
    """The few TrainingArguments the plan depends on (TrainingArguments itself refuses bf16 on a CPU machine)."""

    per_device_train_batch_size: int = field(default=8, metadata={"help": "As in training."})
    activation_checkpointing: bool | None = field(default=None, metadata={"help": "As in training."})
    activation_checkpointing_kwargs: str | None = field(default=None, metadata={"help": "As in training."})
    bf16: bool = field(default=False, metadata={"help": "As in training."})
    fp16: bool = field(default=False, metadata={"help": "As in training."})
    deepspeed: str | None = field(default=None, metadata={"help": "As in training (a DeepSpeed JSON file)."})


def _plan_dataclasses():
    from .config import DataArguments, GenerationArguments, LoraArguments, MemoryArguments, ModelArguments

    return (ModelArguments, DataArguments, LoraArguments, MemoryArguments, GenerationArguments,
            PlanTrainingArguments, PlanArguments)


def parse_plan_args(argv: list[str]):
    """The experiment's config + flags, as training reads them; training-only settings are accepted and ignored."""
    import argparse

    from transformers import HfArgumentParser, TrainingArguments

    from .config import RunArguments, load_yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = HfArgumentParser(_plan_dataclasses())
    parser.add_argument("--config", default=None, help="The experiment's config.yaml.")
    dests = {action.dest for action in parser._actions} - {"help", "config"}
    ignored = {f.name for cls in (TrainingArguments, RunArguments) for f in dataclasses.fields(cls)}
    if known.config:
        values = load_yaml(known.config, dests | ignored)
        parser.set_defaults(**{k: v for k, v in values.items() if k in dests})
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    for token in remaining:
        name = token[2:].split("=")[0].replace("-", "_") if token.startswith("--") else None
        if name is not None and name not in ignored:
            raise PlanError(f"command line: unknown argument {token}; see --help for every setting.")
    return tuple(p for p in parsed if not isinstance(p, argparse.Namespace)), known.config


def _deepspeed_config(path: str | None, experiment_dir: Path | None, device: str) -> tuple[dict, str | None]:
    """The DeepSpeed config in use: the configured one, else the experiment's ds_config_zero2.json on GPUs (the
    launcher adds it there by default)."""
    candidate = path
    if candidate is None and device == "cuda" and experiment_dir is not None:
        default = experiment_dir / "ds_config_zero2.json"
        candidate = str(default) if default.is_file() else None
    if candidate is None:
        return {}, None
    try:
        return json.loads(Path(candidate).read_text(encoding="utf-8")), candidate
    except (OSError, ValueError) as err:
        raise PlanError(f"setting 'deepspeed' = {candidate!r}: cannot read it ({err}).") from err


def setup_from_args(parsed, config_path: str | None) -> tuple[Setup, PlanArguments, int, str]:
    from .config import (ConfigError, DataArguments, GenerationArguments, LoraArguments, MemoryArguments,
                         ModelArguments, validate_memory)

    args = {type(p): p for p in parsed}
    model, data, lora = args[ModelArguments], args[DataArguments], args[LoraArguments]
    memory, gen, training, plan_args = (args[MemoryArguments], args[GenerationArguments],
                                        args[PlanTrainingArguments], args[PlanArguments])
    kwargs = training.activation_checkpointing_kwargs
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs) if kwargs.strip() else None
    try:
        validate_memory(memory, dataclasses.replace(training, activation_checkpointing_kwargs=kwargs))
    except ConfigError as err:
        raise PlanError(str(err)) from err
    experiment_dir = (Path(plan_args.experiment_dir) if plan_args.experiment_dir
                      else Path(config_path).resolve().parent if config_path else None)
    arch = load_architecture(model.model_name_or_path, experiment_dir)
    if plan_args.device not in ("cuda", "cpu"):
        raise PlanError(f"--device {plan_args.device!r}: use cuda or cpu.")
    ds, ds_path = _deepspeed_config(training.deepspeed, experiment_dir, plan_args.device)
    zero = int(ds.get("zero_optimization", {}).get("stage", 0)) if ds else 0
    world = plan_args.num_gpus
    if world is None:
        env = os.environ.get("NUM_PROCESSES")
        world = int(env) * int(os.environ.get("NUM_MACHINES", "1")) if env else (4 if zero else 1)
    bucket = ds.get("zero_optimization", {}).get("reduce_bucket_size", 0) if ds else 0
    bucket = arch.hidden_size ** 2 if bucket == "auto" else int(float(bucket))
    dtype = model.torch_dtype
    if dtype == "auto":
        dtype = "bfloat16" if plan_args.device == "cuda" else "float32"
    weight_bytes = 4 if dtype == "float32" else 2
    act_bytes = 2 if (weight_bytes == 2 or training.bf16 or training.fp16) else 4
    attention = model.attn_implementation
    if attention == "auto":
        attention = "flash_attention_2/sdpa" if plan_args.device == "cuda" else "sdpa"
    targets = tuple(LORA_MODULES if lora.lora_target_modules == ["all-linear"] else lora.lora_target_modules)
    batch = training.per_device_train_batch_size
    labels = plan_args.label_tokens if plan_args.label_tokens is not None else gen.max_new_tokens
    setup = Setup(
        arch=arch, tokens=batch * data.max_seq_length, label_tokens=batch * labels, act_bytes=act_bytes,
        weight_bytes=weight_bytes, lora_r=lora.lora_r, lora_targets=targets, lora_dropout=lora.lora_dropout,
        checkpointing=bool(training.activation_checkpointing), offload=memory.offload_activations,
        tiled_mlp=memory.tiled_mlp, tile_tokens=memory.tiled_mlp_tile_tokens,
        attention="eager" if attention == "eager" else attention, device=plan_args.device, world_size=world,
        zero_stage=zero, reduce_bucket_elements=bucket, lora_params_fp32=(zero == 0 and weight_bytes == 2),
    )
    where = "per GPU" if plan_args.device == "cuda" else "per process (CPU)"
    title = (f"Memory plan {where} for {config_path or 'the command line'}: {model.model_name_or_path}, "
             f"{data.max_seq_length:,} tokens x {batch} per micro-batch" + (f" (DeepSpeed: {ds_path})" if ds_path else ""))
    return setup, plan_args, data.max_seq_length, title


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        from transformers import HfArgumentParser

        parser = HfArgumentParser(_plan_dataclasses(), description=__doc__)
        parser.add_argument("--config", default=None, help="The experiment's config.yaml.")
        parser.print_help()
        return 0
    try:
        parsed, config_path = parse_plan_args(argv)
        setup, plan_args, tokens_per_sample, title = setup_from_args(parsed, config_path)
    except (PlanError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    plan = estimate(setup)
    limit = plan_args.gpu_memory_gib if setup.device == "cuda" else None
    print(format_plan(plan, limit, title, tokens_per_sample), flush=True)
    if limit is not None and not fits(plan, limit):
        return EXIT_DOES_NOT_FIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
