"""Long-context LoRA steps of the real Qwen3-4B architecture on one GPU: peak memory, seconds, tokens/s and MFU,
baseline vs the project's loss with each memory switch. Each (mode, length) runs in a fresh process.

    python benchmarks/gpu_long_context.py                       # one GPU: 32K .. 256K tokens (+ 512K with offload)
    python benchmarks/gpu_long_context.py --seq-lens 131072 --modes ours+tiled ours+tiled+offload
    python benchmarks/gpu_long_context.py --cpu-smoke           # no GPU: tiny sizes on the CPU, proves the script runs

Model: Qwen3-4B-Instruct-2507's architecture from experiments/009_text_summary/model_architecture.json (hidden 2560,
36 layers, 32 / 8 heads, head_dim 128, MLP 9728, vocabulary 151,936, tied), random init, bf16 weights; LoRA r=16,
alpha 32, dropout 0.05 on all seven projections, cast to bf16 as DeepSpeed's bf16 engine does; non-reentrant
activation checkpointing of every layer; attention flash_attention_2 when it imports, else SDPA; AdamW on the
adapters. No DeepSpeed (one GPU). The sample is L random tokens whose last --summary-tokens are the labels.
Modes: baseline (HF causal-LM loss, logits at every position), ours (longctx.loss: logits at label positions),
ours+tiled (tiled_mlp), ours+offload (offload_activations), ours+tiled+offload. 524,288 tokens runs only the
offload modes. Each run does --steps steps (the first warms up allocator and kernels) and reports the last.

Reported per run: torch.cuda.max_memory_allocated / max_memory_reserved (GiB), step seconds (forward + backward +
optimizer step, synchronised), tokens/s, and MFU = model FLOPs / (seconds x peak bf16 FLOP/s), where
  model FLOPs = T x (4 x N_base + 6 x N_lora) + 6 x layers x heads x head_dim x T^2 + 4 x vocab x hidden x labels
  T: tokens; N_base: the decoder layers' frozen linear weights (forward 2, input gradient 2 FLOPs per weight and
  token); N_lora: adapter weights (+ their weight gradient: 6); attention: causal QK^T and AV forward
  (2 x heads x head_dim x T^2 per layer) + backward (twice that); the LM head at the label positions only, also for
  the baseline (its logits elsewhere are waste, not useful work). Recomputation (checkpointing, TiledMLP's second
  MLP forward) is not counted. Peak: --peak-tflops, else 989 for H100 / H200 SXM, 312 for A100.
The planner's estimate for the same setup (longctx.planner) is printed beside each run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

ARCHITECTURE = REPO_ROOT / "experiments" / "009_text_summary" / "model_architecture.json"
MODES = ("baseline", "ours", "ours+tiled", "ours+offload", "ours+tiled+offload")
GPU_SEQ_LENS = (32768, 65536, 131072, 262144)
OFFLOAD_ONLY_SEQ_LENS = (524288,)
SMOKE = {"arch": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 16, "intermediate_size": 160, "vocab_size": 1000, "tie_word_embeddings": True},
         "seq_lens": (256, 512), "offload_only": (1024,), "summary_tokens": 32, "tile_tokens": 128}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
GIB = 2**30


def model_flops(arch: dict, tokens: int, labels: int, lora_params: int) -> float:
    h, heads, head_dim, kv, inter = (arch["hidden_size"], arch["num_attention_heads"], arch["head_dim"],
                                     arch["num_key_value_heads"], arch["intermediate_size"])
    base = arch["num_hidden_layers"] * (h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter)
    attention = 6 * arch["num_hidden_layers"] * heads * head_dim * tokens ** 2
    return tokens * (4 * base + 6 * lora_params) + attention + 4 * arch["vocab_size"] * h * labels


def unpinned_save_on_cpu(pin_memory: bool = False, device_type: str = "cuda"):
    """transformers' offload without pinning, for --cpu-smoke: pinning needs an accelerator."""
    import torch

    return torch.autograd.graph.save_on_cpu(pin_memory=False, device_type="cpu")


def build_lora_model(arch: dict, mode: str, cuda: bool, lora_r: int = 16, tile_tokens: int = 8192,
                     max_positions: int = 262144):
    """Qwen3 of `arch` (random weights; bf16 on CUDA, fp32 on the CPU) with LoRA on all seven projections as 009
    has it (r, alpha 2r, dropout 0.05), cast to bf16 as DeepSpeed's bf16 engine does, non-reentrant activation
    checkpointing of every layer, and the memory switches of `mode` (tiled MLP, activation offload). Returns
    (model, attention implementation, trainable parameters)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from longctx.model.loading import apply_lora, resolve_attn_implementation
    from longctx.model.tiling import enable_tiled_mlp
    from longctx.settings import LoraArguments

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    attention = resolve_attn_implementation("auto")
    torch.manual_seed(0)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    config = Qwen3Config(**{k: arch[k] for k in keys}, max_position_embeddings=max_positions,
                         rope_theta=arch.get("rope_theta", 5000000), use_cache=False, attn_implementation=attention)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no fp32 copy of 4 B parameters on the GPU
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    torch.set_default_dtype(default_dtype)
    model = apply_lora(model, LoraArguments(lora_r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.05,
                                            lora_target_modules=["all-linear"]))
    model.to(dtype)  # adapters in bf16, as under DeepSpeed's bf16 engine
    model.train()
    offload = "offload" in mode
    if offload and not cuda:
        import transformers.modeling_utils

        transformers.modeling_utils.save_on_cpu = unpinned_save_on_cpu
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
    if "tiled" in mode:
        enable_tiled_mlp(model, tile_tokens)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, attention, trainable


def measure_step(model, optimizer, mode: str, seq_len: int, summary_tokens: int, vocab_size: int, cuda: bool,
                 steps: int = 1) -> dict:
    """`steps` LoRA steps (forward + backward + optimizer step) on one sample of `seq_len` random tokens whose last
    `summary_tokens` are the labels; the last one measured: status, loss, seconds, and the peaks since it began
    (CUDA: allocated and reserved; CPU: the process's peak RSS)."""
    import torch

    from longctx.model.loss import summary_loss

    device = next(model.parameters()).device
    ids = torch.randint(0, vocab_size, (1, seq_len), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, -summary_tokens:] = ids[:, -summary_tokens:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    row, seconds = {}, None
    try:
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if mode == "baseline":
                outputs = model(**batch, use_cache=False)
                loss = outputs.loss
                del outputs
            else:
                loss, _ = summary_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        row.update(status="ok", loss=round(float(loss), 4), seconds=round(seconds, 3),
                   tokens_per_second=round(seq_len / seconds, 1))
    except torch.OutOfMemoryError as err:
        row.update(status="oom", error=str(err).splitlines()[0][:300])
    if cuda:
        row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        row["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    else:
        row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
    return row


def run_child(args) -> dict:
    import torch

    mode, seq_len = args.modes[0], args.seq_lens[0]
    arch = json.loads(Path(args.architecture).read_text()) if not args.cpu_smoke else SMOKE["arch"]
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    model, attention, trainable = build_lora_model(arch, mode, cuda, args.lora_r, args.tile_tokens,
                                                   max(seq_len, 262144))
    lora_params = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    if cuda:
        torch.cuda.empty_cache()
    row = {"mode": mode, "seq_len": seq_len, "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
           "attention": attention, "dtype": "bfloat16" if cuda else "float32", "lora_params": lora_params}
    row.update(measure_step(model, optimizer, mode, seq_len, args.summary_tokens, arch["vocab_size"], cuda,
                            args.steps))
    if row["status"] == "ok":
        flops = model_flops(arch, seq_len, args.summary_tokens, lora_params)
        row["model_tflops_per_step"] = float(f"{flops / 1e12:.4g}")
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if cuda and k in row["device"]), None)
        row["mfu"] = round(flops / row["seconds"] / (peak * 1e12), 4) if peak else None
    return row


def planner_estimate(args, mode: str, seq_len: int) -> dict:
    from longctx.model.architecture import Architecture
    from longctx.planner.estimate import StepShape, estimate

    arch = SMOKE["arch"] if args.cpu_smoke else json.loads(Path(args.architecture).read_text())
    smoke = args.cpu_smoke
    shape = StepShape(arch=Architecture.from_config(arch, "benchmark"), tokens=seq_len,
                      label_tokens=seq_len if mode == "baseline" else args.summary_tokens, act_bytes=4 if smoke else 2,
                      weight_bytes=4 if smoke else 2, lora_r=args.lora_r, lora_dropout=0.05, checkpointing=True,
                      offload="offload" in mode, tiled_mlp="tiled" in mode, tile_tokens=args.tile_tokens,
                      attention="sdpa" if smoke else "flash_attention_2", device="cpu" if smoke else "cuda")
    return {"planner_peak_gib": float(f"{estimate(shape).peak_bytes / GIB:.4g}")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None,
                        help="Tokens per sample (default: 32768 65536 131072 262144, + 524288 for offload modes).")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--architecture", default=str(ARCHITECTURE), help="config.json-style architecture values.")
    parser.add_argument("--summary-tokens", type=int, default=512, help="Label tokens at the end of the sample.")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--tile-tokens", type=int, default=8192, help="tiled_mlp_tile_tokens of the tiled modes.")
    parser.add_argument("--steps", type=int, default=2, help="Steps per run; the last is reported.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Peak dense bf16 TFLOP/s of the GPU.")
    parser.add_argument("--timeout-seconds", type=int, default=1800, help="Per run.")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="Tiny model and lengths on the CPU (fp32, peak RSS instead of CUDA memory, no MFU).")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.summary_tokens, args.tile_tokens = SMOKE["summary_tokens"], SMOKE["tile_tokens"]
        args.steps = 1 if args.steps == 2 else args.steps
    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return 0

    if not args.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU here; run on one GPU, or pass --cpu-smoke to check the script on the CPU.",
                  file=sys.stderr)
            return 1
    if args.seq_lens:
        plan = [(mode, n) for n in args.seq_lens for mode in args.modes]
    else:
        lens, offload_lens = ((SMOKE["seq_lens"], SMOKE["offload_only"]) if args.cpu_smoke
                              else (GPU_SEQ_LENS, OFFLOAD_ONLY_SEQ_LENS))
        plan = [(mode, n) for n in lens for mode in args.modes]
        plan += [(mode, n) for n in offload_lens for mode in args.modes if "offload" in mode]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    rows = []
    for mode, seq_len in plan:
        command = [sys.executable, __file__, "--child", "--modes", mode, "--seq-lens", str(seq_len),
                   "--architecture", args.architecture, "--summary-tokens", str(args.summary_tokens),
                   "--lora-r", str(args.lora_r), "--tile-tokens", str(args.tile_tokens), "--steps", str(args.steps)]
        command += ["--cpu-smoke"] if args.cpu_smoke else []
        command += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout_seconds)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "mode": mode, "seq_len": seq_len, "status": "error",
                "error": (result.stderr.strip().splitlines() or [""])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"mode": mode, "seq_len": seq_len, "status": "timeout", "error": f">{args.timeout_seconds}s"}
        row.update(planner_estimate(args, mode, seq_len))
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if r.get("status") == "ok"]
    memory_key = "peak_rss_gib" if args.cpu_smoke else "max_memory_allocated_gib"
    summary = {"runs": len(rows), "ok": len(ok),
               "longest_ok_tokens": {m: max([r["seq_len"] for r in ok if r["mode"] == m], default=None)
                                     for m in args.modes},
               "memory_key": memory_key}
    print(json.dumps(summary), flush=True)
    # An out-of-memory row is a measurement (the baseline at 262,144 tokens is expected to run out); a row that
    # crashed or timed out is not, and neither is a sweep where nothing ran.
    broken = [r for r in rows if r.get("status") not in ("ok", "oom")]
    return 1 if broken or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
