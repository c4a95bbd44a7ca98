"""CPU proxy of the long-context memory problem: one LoRA forward + backward with non-reentrant activation
checkpointing, per configuration and sequence length, each in a fresh process; peak RSS and seconds.

    python benchmarks/memory_cpu.py                                   # L = 4096 8192 16384, every mode
    python benchmarks/memory_cpu.py --seq-lens 8192 --modes ours ours+tiled

Model: random-init Qwen3, hidden 256, 4 layers, 4 heads (1 KV head, head_dim 64), MLP 1024, vocabulary 151,936
(Qwen3's), tied embeddings, fp32, SDPA; LoRA r=16, alpha 32, dropout 0.05 on all seven projections (009's
adapter). The prompt is L random tokens whose last 256 are the summary (labels; -100 elsewhere).
Modes:
  baseline      the standard HF causal-LM loss: model(..., labels=labels), logits for all L positions
  ours          the project's loss (longctx.model.loss.summary_loss): logits only at the 256 label positions
  ours+tiled    + tiled_mlp (longctx.tiling, DeepSpeed TiledMLP), tiles of --tile-tokens
  ours+offload  + transformers' activation offload (save_on_cpu around each checkpointed layer). On a CPU the
                "device" is host memory, so nothing can be saved; pinning needs an accelerator, so the benchmark
                runs transformers' path unpinned and reports the bytes it routed to the host (offloaded_gib)
Output: one JSON line per run (mode, seq_len, peak_rss_gib, seconds, ...), with the planner's estimate for the same
model beside it (planner_peak_gib: weights + adapters + activations, without the process's own ~0.5 GiB), then one
line with baseline_over_ours per L, ours_16384_over_ours_8192, and measured vs planned activation growth between
sequence lengths. A baseline run whose planned peak exceeds the memory available now is skipped (and says so).
glibc's mmap threshold is fixed at 1 MiB in the children, so freed tensors return to the OS and peak RSS follows
the tensors alive at the peak rather than heap fragmentation.
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

MODES = ("baseline", "ours", "ours+tiled", "ours+offload")
SUMMARY_TOKENS = 256
ARCH = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 64, "intermediate_size": 1024, "vocab_size": 151936, "tie_word_embeddings": True}
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
GIB = 2**30


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def qwen3_config(seq_len: int):
    """The benchmark model's transformers config (ARCH), with positions for seq_len tokens, SDPA, no KV cache."""
    from transformers import Qwen3Config

    return Qwen3Config(**ARCH, max_position_embeddings=max(seq_len, 32768), use_cache=False,
                       attn_implementation="sdpa")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a measured child process: glibc's mmap threshold fixed at 1 MiB (freed tensors leave the
    RSS), this checkout importable, no tokenizer threads."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false",
                **extra)


class CountingSaveOnCpu:
    """Stands in for torch.autograd.graph.save_on_cpu inside transformers' checkpoint wrapper: the same hooks,
    unpinned (pinning needs an accelerator), counting the bytes routed to the host."""

    packed_bytes = 0

    def __new__(cls, pin_memory: bool = False, device_type: str = "cuda"):
        import torch

        def pack(tensor):
            CountingSaveOnCpu.packed_bytes += tensor.untyped_storage().nbytes() if tensor.numel() else 0
            return tensor.device, tensor.cpu()

        def unpack(packed):
            device, tensor = packed
            return tensor.to(device)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def run_child(mode: str, seq_len: int, tile_tokens: int, seed: int) -> dict:
    import torch
    from transformers import Qwen3ForCausalLM

    from longctx.model.loading import apply_lora
    from longctx.model.loss import summary_loss
    from longctx.model.tiling import enable_tiled_mlp
    from longctx.settings import LoraArguments

    torch.manual_seed(seed)
    model = apply_lora(Qwen3ForCausalLM(qwen3_config(seq_len)),
                       LoraArguments(**LORA, lora_target_modules=["all-linear"]))
    model.train()
    offload = mode == "ours+offload"
    if offload:
        import transformers.modeling_utils

        transformers.modeling_utils.save_on_cpu = CountingSaveOnCpu
    # what the Trainer does for activation_checkpointing: true + activation_checkpointing_kwargs
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
    if mode == "ours+tiled":
        enable_tiled_mlp(model, tile_tokens)

    ids = torch.randint(0, ARCH["vocab_size"], (1, seq_len))
    labels = torch.full_like(ids, -100)
    labels[:, -SUMMARY_TOKENS:] = ids[:, -SUMMARY_TOKENS:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    before = rss_gib()
    start = time.perf_counter()
    if mode == "baseline":
        outputs = model(**batch, use_cache=False)  # transformers' ForCausalLMLoss over logits of every position
        loss = outputs.loss
        del outputs  # as in the Trainer, the logits are not kept alive through the backward
    else:
        loss, _ = summary_loss(model, batch)
    loss.backward()
    seconds = time.perf_counter() - start
    row = {"mode": mode, "seq_len": seq_len, "peak_rss_gib": round(peak_rss_gib(), 4), "seconds": round(seconds, 2),
           "rss_before_step_gib": round(before, 4), "loss": round(float(loss.detach()), 4), "threads": torch.get_num_threads(),
           "load_avg_1min": round(os.getloadavg()[0], 2)}
    if offload:
        row["offloaded_gib"] = round(CountingSaveOnCpu.packed_bytes / GIB, 4)
    if mode == "ours+tiled":
        row["tile_tokens"] = tile_tokens
    return row


def plan_for(mode: str, seq_len: int, tile_tokens: int):
    from longctx.model.architecture import Architecture
    from longctx.planner.estimate import StepShape, estimate

    arch = Architecture.from_config(ARCH, "benchmarks/memory_cpu.py")
    shape = StepShape(arch=arch, tokens=seq_len, label_tokens=seq_len if mode == "baseline" else SUMMARY_TOKENS,
                      act_bytes=4, weight_bytes=4, lora_r=LORA["lora_r"], lora_dropout=LORA["lora_dropout"],
                      checkpointing=True, offload=mode == "ours+offload", tiled_mlp=mode == "ours+tiled",
                      tile_tokens=tile_tokens, attention="sdpa", device="cpu", optimizer=False)
    return estimate(shape)


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] * 1024 / GIB


def growth(rows: dict, mode: str, low: int, high: int) -> dict | None:
    a, b = rows.get((mode, low)), rows.get((mode, high))
    if not a or not b or "peak_rss_gib" not in a or "peak_rss_gib" not in b:
        return None
    measured = b["peak_rss_gib"] - a["peak_rss_gib"]
    planned = b["planner_activation_gib"] - a["planner_activation_gib"]
    return {"mode": mode, "from": low, "to": high, "measured_gib": round(measured, 4), "planned_gib": round(planned, 4),
            "relative_error": round((planned - measured) / measured, 3) if measured > 0 else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384], help="Prompt lengths L.")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--tile-tokens", type=int, default=1024, help="Tile length of ours+tiled.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(args.modes[0], args.seq_lens[0], args.tile_tokens, args.seed)), flush=True)
        return 0

    rows: dict[tuple[str, int], dict] = {}
    env = child_env()
    for seq_len in args.seq_lens:
        for mode in args.modes:
            plan = plan_for(mode, seq_len, args.tile_tokens)
            estimate = {"planner_peak_gib": round(plan.peak_bytes / GIB, 4),
                        "planner_activation_gib": round(plan.activation_bytes / GIB, 4)}
            need = plan.peak_bytes / GIB + 1.0
            if mode == "baseline" and need > 0.9 * available_gib():
                row = {"mode": mode, "seq_len": seq_len, "skipped": f"planned peak {need:.1f} GiB (with the process) "
                       f"> 90% of the {available_gib():.1f} GiB available now", **estimate}
            else:
                result = subprocess.run([sys.executable, __file__, "--child", "--modes", mode, "--seq-lens",
                                         str(seq_len), "--tile-tokens", str(args.tile_tokens), "--seed",
                                         str(args.seed)], env=env, capture_output=True, text=True)
                lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
                if result.returncode != 0 or not lines:
                    row = {"mode": mode, "seq_len": seq_len, "error": f"exit {result.returncode}: "
                           f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}", **estimate}
                else:
                    row = {**json.loads(lines[-1]), **estimate}
            rows[(mode, seq_len)] = row
            print(json.dumps(row), flush=True)

    def ratio(a: dict | None, b: dict | None) -> float | None:
        if a and b and "peak_rss_gib" in a and "peak_rss_gib" in b:
            return round(a["peak_rss_gib"] / b["peak_rss_gib"], 2)
        return None

    lens = sorted(args.seq_lens)
    summary = {"baseline_over_ours": {str(n): ratio(rows.get(("baseline", n)), rows.get(("ours", n))) for n in lens}}
    if 8192 in lens and 16384 in lens:
        summary["ours_16384_over_ours_8192"] = ratio(rows.get(("ours", 16384)), rows.get(("ours", 8192)))
    pairs = list(zip(lens, lens[1:])) + ([(lens[0], lens[-1])] if len(lens) > 2 else [])
    summary["activation_growth"] = [g for mode in args.modes if mode != "baseline" for low, high in pairs
                                    if (g := growth(rows, mode, low, high)) is not None]
    targets = {}
    if summary["baseline_over_ours"].get("8192") is not None:
        targets["baseline_over_ours_8192_ge_8"] = summary["baseline_over_ours"]["8192"] >= 8
    if summary.get("ours_16384_over_ours_8192") is not None:
        targets["ours_16384_le_1.3x_ours_8192"] = summary["ours_16384_over_ours_8192"] <= 1.3
    errors = [abs(g["relative_error"]) for g in summary["activation_growth"] if g["relative_error"] is not None]
    if errors:
        targets["planner_growth_within_20pct"] = max(errors) <= 0.2
    summary["targets_met"] = targets
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
