"""Scoring N checkpoints: one base load + adapter swaps (what eval_all_checkpoints.sh does) against reloading the base
model for every checkpoint. Same prompts, same greedy generation; the predictions must be identical. CPU.

    python benchmarks/eval_swap.py --run_dir runs/000_tiny_smoke            # the checkpoints of a real run
    python benchmarks/eval_swap.py --num_adapters 6                         # tiny base, random adapters
    python benchmarks/eval_swap.py --num_adapters 6 --hidden_size 1024 --num_layers 8 --max_new_tokens 8
                                                                            # a larger random base: loading weighs more

Prints per-checkpoint model-setup and generation seconds of both ways and the ratios reload / swap, measured in this
one run: checkpoint by checkpoint with the order alternating, each time the minimum over --repeats (other work on a
shared machine only ever adds time). The base weights sit in the page cache after the first load, so each reload
reads from memory, not disk: in the reload path's favour.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from longctx import tiny  # noqa: E402
from longctx.config import parse_config  # noqa: E402
from longctx.data.tokenizer import load_tokenizer  # noqa: E402
from longctx.eval.generation import AdapterSwapper, build_prompts, generate, stop_token_ids  # noqa: E402
from longctx.eval.job import all_setting_names  # noqa: E402
from longctx.model.loading import load_base_model  # noqa: E402
from longctx.run import checkpoints  # noqa: E402
from longctx.settings import DataArguments, GenerationArguments, ModelArguments


def settings(config: Path, overrides: list[str]):
    (model_args, data, gen), _, _ = parse_config(
        ["--config", str(config), *overrides], (ModelArguments, DataArguments, GenerationArguments),
        tolerated_keys=all_setting_names())
    return model_args, data, gen


def random_base(tiny_model: Path, out: Path, hidden_size: int, num_layers: int) -> Path:
    """A randomly initialised Qwen3 of the given size with the tiny tokenizer, saved like a hub model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    config.hidden_size, config.num_hidden_layers = hidden_size, num_layers
    config.intermediate_size = hidden_size * 3
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = hidden_size // 64, 2, 64
    config.layer_types = ["full_attention"] * num_layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def random_adapters(model_args: ModelArguments, out: Path, count: int) -> list[checkpoints.Checkpoint]:
    """`count` LoRA adapters with random (non-zero) B matrices, so each changes the model differently."""
    from peft import LoraConfig, get_peft_model

    base = load_base_model(model_args, training=False)
    found = []
    for i in range(count):
        torch.manual_seed(100 + i)
        # Scaled up (alpha / r = 16) so that each adapter moves the tiny base off its first-token EOS.
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=128, init_lora_weights=False,
                                                target_modules="all-linear"))
        path = out / f"checkpoint-{i + 1}"
        model.save_pretrained(path)
        found.append(checkpoints.Checkpoint(path, i + 1))
        base = model.unload()  # the plain base again, for the next adapter
    return found


def compare(model_args, tokenizer, prompts, gen, ckpts, repeats: int) -> dict:
    """Both ways, checkpoint by checkpoint, alternating which goes first, `repeats` times; each time is the minimum
    over the repeats (what the work costs when nothing else on the machine gets in the way).
    swap: one base load per repeat, then per checkpoint load_adapter / set_adapter / delete_adapter.
    reload: per checkpoint a fresh base + PeftModel.from_pretrained."""
    from peft import PeftModel

    def now():  # wall seconds, and CPU seconds of this process (all threads): the latter ignores other load
        return time.perf_counter(), time.process_time()

    def since(t):
        wall, cpu = now()
        return wall - t[0], cpu - t[1]

    times = {"base_load": [], **{f"{way}_{part}": [[] for _ in ckpts] for way in ("swap", "reload")
                                 for part in ("setup", "generation")}}
    predictions = {"swap": [None] * len(ckpts), "reload": [None] * len(ckpts)}
    same = True
    for _ in range(repeats):
        gc.collect()
        t0 = now()
        swapper = AdapterSwapper(load_base_model(model_args, training=False).eval())
        times["base_load"].append(since(t0))
        for i, ckpt in enumerate(ckpts):
            for way in (("swap", "reload") if i % 2 == 0 else ("reload", "swap")):
                gc.collect()
                t0 = now()
                if way == "swap":
                    model, base = swapper.activate(ckpt.path), swapper.base
                else:
                    base = load_base_model(model_args, training=False).eval()
                    model = PeftModel.from_pretrained(base, str(ckpt.path), is_trainable=False).eval()
                times[f"{way}_setup"][i].append(since(t0))
                t1 = now()
                out = generate(model, tokenizer, prompts, gen, stop_token_ids(tokenizer, base))
                times[f"{way}_generation"][i].append(since(t1))
                same &= predictions[way][i] in (None, out)
                predictions[way][i] = out
                del model, base
        del swapper
    # (wall, cpu) minima, each over the repeats
    best = {key: (tuple(map(min, zip(*v))) if key == "base_load" else [tuple(map(min, zip(*per))) for per in v])
            for key, v in times.items()}
    return {"times": best, "predictions": predictions, "repeatable": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, help="Score this run's checkpoints (its run_config.yaml).")
    parser.add_argument("--num_adapters", type=int, default=6, help="Without --run_dir: random adapters to make.")
    parser.add_argument("--hidden_size", type=int, help="Without --run_dir: a random base of this width ...")
    parser.add_argument("--num_layers", type=int, default=8, help="... and this depth, instead of the tiny model.")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="Each time reported is the minimum over the repeats.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads. 1 by default: on a shared machine a second thread spins while it waits "
                             "for a core and inflates both clocks at random.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = []
    if args.max_eval_samples:
        overrides += ["--max_eval_samples", str(args.max_eval_samples)]
    if args.max_new_tokens:
        overrides += ["--max_new_tokens", str(args.max_new_tokens)]
    tmp = tempfile.TemporaryDirectory(prefix="eval_swap_")
    if args.run_dir:
        model_args, data, gen = settings(args.run_dir / "run_config.yaml", overrides)
        ckpts = checkpoints.find_checkpoints(args.run_dir, warn=print, require_manifest=False)
        source = f"{len(ckpts)} checkpoints of {args.run_dir}"
    else:
        tiny_dir = tiny.build(REPO_ROOT / ".cache" / "tiny_smoke")
        model_args, data, gen = settings(REPO_ROOT / "experiments" / "000_tiny_smoke" / "config.yaml", overrides)
        if args.hidden_size:
            model_args.model_name_or_path = str(random_base(tiny_dir / "model", Path(tmp.name) / "base",
                                                            args.hidden_size, args.num_layers))
        ckpts = random_adapters(model_args, Path(tmp.name), args.num_adapters)
        source = f"{len(ckpts)} random adapters"
    tokenizer = load_tokenizer(model_args, padding_side="left")
    prompts, _ = build_prompts(tokenizer, data)
    warm = load_base_model(model_args, training=False).eval()  # page cache, kernels, allocator: warm for both ways
    generate(warm, tokenizer, prompts[:1], gen)
    params = sum(p.numel() for p in warm.parameters())
    del warm
    print(f"base {model_args.model_name_or_path} ({params / 1e6:.1f} M parameters), {source}, {len(prompts)} "
          f"prompts, max_new_tokens {gen.max_new_tokens}, batch {gen.generation_batch_size}, "
          f"{torch.get_num_threads()} threads")

    r = compare(model_args, tokenizer, prompts, gen, ckpts, args.repeats)
    t = r["times"]
    swap_out, reload_out = r["predictions"]["swap"], r["predictions"]["reload"]
    print(f"minimum over {args.repeats} repeat(s); base load (once per invocation when swapping): "
          f"{t['base_load'][0]:.3f} s wall")
    print(f"{'wall seconds':<18}{'swap setup':>12}{'reload setup':>14}{'swap gen':>10}{'reload gen':>12}{'same':>6}")
    for i, ckpt in enumerate(ckpts):
        print(f"{ckpt.name:<18}{t['swap_setup'][i][0]:>12.3f}{t['reload_setup'][i][0]:>14.3f}"
              f"{t['swap_generation'][i][0]:>10.3f}{t['reload_generation'][i][0]:>12.3f}"
              f"{str(swap_out[i] == reload_out[i]):>6}")
    for k, clock in enumerate(("wall", "CPU")):
        setup = {"swap": t["base_load"][k] + sum(x[k] for x in t["swap_setup"]),
                 "reload": sum(x[k] for x in t["reload_setup"])}
        total = {way: setup[way] + sum(x[k] for x in t[f"{way}_generation"]) for way in setup}
        print(f"{clock} seconds: model setup (base load + adapters) swap {setup['swap']:.3f}, reload "
              f"{setup['reload']:.3f}, ratio reload/swap {setup['reload'] / setup['swap']:.2f}; total (setup + "
              f"generation) swap {total['swap']:.2f}, reload {total['reload']:.2f}, ratio reload/swap "
              f"{total['reload'] / total['swap']:.2f}")
    print(f"predictions equal across repeats: {r['repeatable']}")
    identical = swap_out == reload_out and r["repeatable"]
    print(f"predictions identical for every checkpoint: {identical}")
    distinct = len({tuple(o) for o in swap_out})
    print(f"distinct prediction sets across checkpoints: {distinct} of {len(ckpts)}")
    tmp.cleanup()
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
