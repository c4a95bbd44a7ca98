"""The per-GPU memory of one training step, from the architecture and the settings alone (no weights, no CUDA).

How each part is estimated (b = bytes per activation element, S = tokens per micro-batch; per-token counts are
what autograd saves for the backward in transformers' Qwen3/Llama decoder layer with PEFT LoRA, checked against
the tensors a real layer saves in tests/test_planner_estimate.py):
  weights                base parameters x weight bytes (tied embeddings counted once)
  LoRA + optimizer       adapter weights on every GPU; fp32 master, gradient and Adam moments split over the
                         ZeRO world (all on one GPU without DeepSpeed); ZeRO's reduce buckets go to framework
  checkpointed inputs    layers x S x hidden x b (what activation checkpointing keeps between forward and
                         backward), + the final norm's fp32 input; with offload_activations they go to pinned host
                         memory (longctx.planner.host), and the GPU keeps one layer's input in flight plus the one
                         brought back for its recompute
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
                         and 5% allocator slack on the activations, with the CUDA allocator's expandable segments
                         (the launchers set PYTORCH_ALLOC_CONF=expandable_segments:True for training and evaluation:
                         samples of every length up to 262,144 tokens reuse one growing segment instead of leaving
                         cached blocks of earlier sizes); off, the slack is not a bound
Sequence parallelism (sequence_parallel_size N, Ulysses): S is the tokens of one GPU, the sample's tokens / N.
Every part above is per token, so it shrinks N-fold: the layer inputs, norms and MLP tensors belong to the GPU's
slice of the sequence; q, k, v, the attention output and the attention backward's buffers belong to the whole
sequence but 1/N of the heads, the same bytes. On top, the all-to-all exchanges of one layer (q, k, v before the
attention and its output after it in the forward and the recompute, their gradients in the backward), each with
its send and receive buffers in flight at once: 2 x (q + 2 kv + q) x S x b, counted in the attention backward
(Qwen3-4B, N = 4 at 262,144 tokens: 2 x (4,096 + 2,048 + 4,096) x 65,536 x 2 bytes = 2.5 GiB). The logits stay
whole on one GPU: the summary sits at the end of the sample, in the last GPU's slice.
The peak is: the held parts + the largest of the transient phases (the loss, one layer's recompute during its MLP
backward, or during its attention backward), which happen one after another, not together.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..model.architecture import Architecture
from ..utils.disk import GIB, human_bytes  # noqa: F401 - human_bytes: the planner's modules take it from here

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CUDA_CONTEXT_BYTES = 1.0 * GIB     # context, cuBLAS / cuDNN workspaces, kernels: outside torch's allocator
NCCL_BYTES = 0.5 * GIB             # communicator buffers with more than one GPU
ALLOCATOR_SLACK = 0.05             # caching-allocator fragmentation, as a share of the activation memory


def expandable_segments(env=os.environ) -> bool:
    """Whether training will run with the CUDA allocator's expandable segments: the launchers add them to
    PYTORCH_ALLOC_CONF unless it says otherwise (scripts/common.sh); only an explicit `expandable_segments:False`
    turns them off."""
    conf = env.get("PYTORCH_ALLOC_CONF") or env.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    return "expandable_segments:false" not in conf.replace(" ", "").lower()


@dataclass
class StepShape:
    """What one training step looks like on one GPU: everything the estimate depends on."""

    arch: Architecture
    tokens: int                              # tokens per micro-batch on one GPU (batch x sequence / sp_size)
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
    sp_size: int = 1                         # GPUs sharing one sample (Ulysses sequence parallelism)

    def replace(self, **changes) -> StepShape:
        return dataclasses.replace(self, **changes)


@dataclass
class Part:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryEstimate:
    shape: StepShape
    held: list[Part]                         # for the whole step, or from the forward to the backward
    phases: list[Part]                       # transient, one after another: the largest counts
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


def layer_saved_bytes_per_token(s: StepShape) -> dict[str, float]:
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


def mlp_transient_bytes_per_token(s: StepShape) -> float:
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


def attention_workspace_bytes(s: StepShape) -> float:
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


def all_to_all_bytes(s: StepShape) -> float:
    """Ulysses' exchanges of one layer in flight, send and receive buffers: 2 x (q + 2 kv + q) x S x b (module
    docstring); 0 without sequence parallelism."""
    if s.sp_size == 1:
        return 0.0
    a = s.arch
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    return 2.0 * (q + 2 * kv + q) * s.tokens * s.act_bytes


def adapter_parameters(arch: Architecture, lora_r: int, targets: tuple[str, ...]) -> int:
    """LoRA weights: r x (in + out) per targeted projection, every layer."""
    shapes = arch.linear_shapes()
    return arch.num_hidden_layers * sum(lora_r * (shapes[m][0] + shapes[m][1]) for m in targets if m in shapes)


def lora_parameter_count(s: StepShape) -> int:
    return adapter_parameters(s.arch, s.lora_r, s.lora_targets)


def _checkpointed_inputs(s: StepShape, attention_saved: float, mlp_saved: float) -> tuple[list[Part], list[str]]:
    """What is held between a layer's forward and its backward: (parts on the device, notes)."""
    a, b, S = s.arch, s.act_bytes, s.tokens
    h, layers = a.hidden_size, a.num_hidden_layers
    layer_input = S * h * b
    if not s.checkpointing:
        other_layers = (layers - 1) * (attention_saved + mlp_saved + layer_input)
        notes = (["offload_activations needs activation_checkpointing: it offloads the checkpointed inputs."]
                 if s.offload else [])
        return [Part("saved activations of the other layers", other_layers + S * h * 4,
                     "no activation checkpointing: every layer keeps what it saves")], notes
    name = "checkpointed layer inputs"
    layer_inputs = layers * layer_input + 2 * S * a.head_dim * b  # + rotary cos / sin, shared by the layers
    final_norm = S * h * 4
    if s.offload and s.device == "cpu":  # nothing is pinned on a CPU: the inputs are copied, not rounded
        return [Part(name, layer_inputs + final_norm,
                     f"{layers} layers x {human_bytes(layer_input)} + final norm {human_bytes(final_norm)}; "
                     f"offload on a CPU: the host is where they already are")], []
    if s.offload:  # cos / sin arrive as keyword arguments, which the checkpoint does not pack: they stay
        on_gpu = 2 * layer_input + 2 * S * a.head_dim * b  # one in flight + one back for its recompute
        return [Part(name, on_gpu + final_norm,
                     f"offloaded: {layers} x {human_bytes(layer_input)} to pinned host memory (host memory below); "
                     f"on the GPU one layer's input in flight + one back for its recompute, + final norm "
                     f"{human_bytes(final_norm)}")], []
    return [Part(name, layer_inputs + final_norm,
                 f"{layers} layers x {human_bytes(layer_input)} + final norm {human_bytes(final_norm)}")], []


def estimate(s: StepShape) -> MemoryEstimate:
    a, b, S = s.arch, s.act_bytes, s.tokens
    h = a.hidden_size

    weights = a.num_parameters() * s.weight_bytes
    lora = lora_parameter_count(s)
    param_bytes = 4 if (s.lora_params_fp32 or s.weight_bytes == 4) else s.weight_bytes
    if s.zero_stage >= 1:  # bf16 copy on every GPU; fp32 master + fp32 gradient + Adam m, v split over the world
        lora_bytes = lora * s.weight_bytes + lora * (4 + 4 + 8) / s.world_size
    else:  # adapter weights + gradients in their own dtype, Adam m, v in fp32
        lora_bytes = lora * (2 * param_bytes + (8 if s.optimizer else 0))

    saved = layer_saved_bytes_per_token(s)
    tiled = s.tiled_mlp and S > s.tile_tokens
    if tiled:
        tile = math.ceil(S / math.ceil(S / s.tile_tokens))
        mlp_saved = saved["mlp"] * tile
        # TiledMLP's backward: d(input) for the whole sequence + one tile's saved tensors and gradients
        mlp_transient = S * h * b + tile * mlp_transient_bytes_per_token(s)
    else:
        mlp_saved = saved["mlp"] * S
        mlp_transient = S * mlp_transient_bytes_per_token(s)
    attention_saved = saved["attention"] * S
    incoming_grad = S * h * b  # d(hidden) arriving from the layer above
    held_activations, notes = _checkpointed_inputs(s, attention_saved, mlp_saved)

    recompute = Part("one layer's recompute (MLP backward)", attention_saved + mlp_saved + mlp_transient,
                     f"saved: attention {human_bytes(attention_saved)} + MLP {human_bytes(mlp_saved)}"
                     f"{' (one tile)' if tiled else ''}; MLP gradients and buffers {human_bytes(mlp_transient)}")
    workspace = attention_workspace_bytes(s)
    exchange = all_to_all_bytes(s)
    attention = Part("one layer's recompute (attention backward)",
                     attention_saved + workspace + incoming_grad + exchange,
                     f"saved attention {human_bytes(attention_saved)} + backward workspace {human_bytes(workspace)} "
                     f"({s.attention}{', S x S scores' if s.attention == 'eager' else ', O(tokens)'})"
                     + (f" + Ulysses all-to-all buffers {human_bytes(exchange)}" if exchange else ""))
    # forward: logits (b) + fp32 copy + fp32 log-softmax; backward: log-softmax + d(log-softmax) + d(logits) in
    # fp32 (+ d(logits) cast back to b); the backward is the larger
    logits_per_row = a.vocab_size * (12 + (b if b < 4 else 0))
    logits = Part("logits at label positions", s.label_tokens * logits_per_row,
                  f"{s.label_tokens:,} positions x {a.vocab_size:,} vocabulary")

    activations = sum(p.bytes for p in held_activations) + max(recompute.bytes, attention.bytes, logits.bytes)
    count = a.num_parameters()
    count_text = f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.1f} M"
    held = [Part("weights", weights, f"{count_text} parameters x {s.weight_bytes} bytes"),
            Part("LoRA + optimizer", lora_bytes,
                 f"{lora / 1e6:.1f} M adapter parameters" + (f", ZeRO-{s.zero_stage} share of {s.world_size} GPUs"
                                                              if s.zero_stage else "")),
            framework_part(s, activations),
            *held_activations]
    return MemoryEstimate(s, held, [logits, recompute, attention], notes=notes)


def framework_part(s: StepShape, activations: float) -> Part:
    """CUDA context and kernels, NCCL with several GPUs, ZeRO's reduce buckets, and the allocator's slack on
    `activations` (what grows with the sequence); nothing modelled on a CPU."""
    if s.device != "cuda":
        return Part("framework", 0.0, "CPU: the process's own baseline (Python, libraries) is not modelled")
    buckets = 2 * s.reduce_bucket_elements * s.weight_bytes if s.zero_stage >= 1 else 0
    return Part("framework",
                CUDA_CONTEXT_BYTES + (NCCL_BYTES if s.world_size > 1 else 0) + buckets + ALLOCATOR_SLACK * activations,
                f"CUDA context {human_bytes(CUDA_CONTEXT_BYTES)}"
                + (f", NCCL {human_bytes(NCCL_BYTES)}" if s.world_size > 1 else "")
                + (f", ZeRO buckets {human_bytes(buckets)}" if buckets else "")
                + f", allocator slack {ALLOCATOR_SLACK:.0%}"
                + ("" if expandable_segments() else " (expandable segments OFF: fragmentation across sample "
                                                    "lengths is not planned)"))
