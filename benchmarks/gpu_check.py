"""Every GPU-only measurement of this project in one call, so that whoever is lent a GPU gets the truth in minutes.

    bash scripts/gpu_check.sh --download-wheels .whl   # on a CPU machine with PyPI: the wheels a bare GPU image lacks
    bash scripts/gpu_check.sh --wheels .whl            # on the GPU machine (no network): install them, then measure
    bash scripts/gpu_check.sh --cpu-smoke              # the same steps at tiny sizes on a CPU, in under a minute (CI)

Steps, in this order. Each group of steps runs in a process of its own; each step has its own time limit; a step's
line is written the moment it ends, and a step that fails or runs out of time is reported and the next one starts
(in a fresh process when its group's process had to be stopped):
  lora_262144, lora_131072, lora_65536   009's LoRA step on one GPU: the Qwen3-4B architecture
                                         (experiments/009_text_summary/model_architecture.json) with random weights
                                         in bf16, LoRA r=16 on all seven projections, activation checkpointing +
                                         tiled MLP + activation offload (009's switches), the project's loss over the
                                         last 512 tokens; the planner's peak for the same step beside it
  ours_32768, baseline_32768             the same step at 32,768 tokens, and transformers' own loss (logits at every
                                         position, checkpointing only) on the same architecture
  generate_65536, generate_262144        greedy generation from one prompt through the evaluation's code: the
                                         adapter loaded as evaluation loads it (AdapterSwapper), generate_batches;
                                         peak memory, prefill seconds, decode tokens/s, the SDPA kernel torch picks;
                                         the evaluation plan's peak beside it
  cuda_tests                             the tests that need CUDA (pytest -m cuda)
Output, under --out: gpu_check.jsonl (one JSON line per step, then one for the environment) and gpu_check.md (a
table ready for docs/benchmarks.md: the device as nvidia-smi names it, the versions, the command). Exit status 1 when
any step did not pass. Between steps of a group the CUDA cache is emptied and the peaks reset: each length is
measured alone, as the planner plans it. PYTORCH_ALLOC_CONF has expandable segments, as the launchers set it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_long_context as bench  # noqa: E402  (benchmarks/: the model and step of the long-context benchmark)

ARCHITECTURE = REPO_ROOT / "experiments" / "009_text_summary" / "model_architecture.json"
TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "qwen3-4b-instruct-2507"  # the real Qwen3 tokenizer, in the repository
REQUIREMENTS = REPO_ROOT / "scripts" / "gpu_check_requirements.txt"
GIB = 2**30
SUMMARY_TOKENS = 512
NEW_TOKENS = 32  # decode steps per generation: enough for a rate, little next to the prefill
WHEELS_LIMIT_BYTES = 64 * 2**20  # what the device tool carries in one call

# (group, step, tokens, seconds allowed); the first step of a group also pays the process's start (STARTUP)
STEPS = [
    ("lora", "lora_262144", 262144, 240), ("lora", "lora_131072", 131072, 90), ("lora", "lora_65536", 65536, 45),
    ("lora", "ours_32768", 32768, 30), ("baseline", "baseline_32768", 32768, 60),
    ("generate", "generate_65536", 65536, 45), ("generate", "generate_262144", 262144, 90),
    ("cuda_tests", "cuda_tests", 0, 90),
]
STARTUP = 60
SMOKE_TOKENS = {262144: 512, 131072: 256, 65536: 128, 32768: 128}  # the same steps at tiny sizes (--cpu-smoke)
SMOKE_STARTUP, SMOKE_STEP = 60, 20


# --- the measuring processes --------------------------------------------------------------------------------------

def architecture(cpu_smoke: bool, for_generation: bool = False) -> dict:
    if not cpu_smoke:
        return json.loads(ARCHITECTURE.read_text())
    arch = dict(bench.SMOKE["arch"])
    if for_generation:  # the real tokenizer's ids must be valid embeddings
        arch["vocab_size"] = 151936
    return arch


def planned_step_gib(arch: dict, tokens: int, baseline: bool, cuda: bool, tile_tokens: int) -> float:
    from longctx.model.architecture import Architecture
    from longctx.planner.estimate import StepShape, estimate

    shape = StepShape(arch=Architecture.from_config(arch, "gpu_check"), tokens=tokens,
                      label_tokens=tokens if baseline else SUMMARY_TOKENS, act_bytes=2 if cuda else 4,
                      weight_bytes=2 if cuda else 4, lora_r=16, lora_dropout=0.05, checkpointing=True,
                      offload=not baseline, tiled_mlp=not baseline, tile_tokens=tile_tokens,
                      attention="flash_attention_2/sdpa" if cuda else "sdpa", device="cuda" if cuda else "cpu")
    return estimate(shape).peak_bytes / GIB


def run_lora_steps(steps: list[tuple], cpu_smoke: bool, emit) -> None:
    import torch

    cuda = torch.cuda.is_available() and not cpu_smoke
    arch = architecture(cpu_smoke)
    tile_tokens = bench.SMOKE["tile_tokens"] if cpu_smoke else 8192
    summary = bench.SMOKE["summary_tokens"] if cpu_smoke else SUMMARY_TOKENS
    baseline = steps[0][1].startswith("baseline")
    mode = "baseline" if baseline else "ours+tiled+offload"
    model, attention, trainable = bench.build_lora_model(arch, mode, cuda, 16, tile_tokens)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    for _, name, tokens, _ in steps:
        if cuda:
            torch.cuda.empty_cache()
        row = {"step": name, "tokens": tokens, "mode": mode, "attention": attention}
        row.update(bench.measure_step(model, optimizer, mode, tokens, summary, arch["vocab_size"], cuda))
        row["planned_peak_gib"] = round(planned_step_gib(arch, tokens, baseline, cuda, tile_tokens), 2)
        if row["status"] == "ok":
            lora = sum(p.numel() for p in trainable)
            flops = bench.model_flops(arch, tokens, summary, lora)
            row["mfu"] = round(flops / row["seconds"] / 989e12, 4) if cuda else None
        emit(row)


def sdpa_kernel(arch: dict, device, dtype) -> str:
    """The kernel torch's scaled_dot_product_attention picks for a causal prefill of this architecture's heads (grouped
    query attention as transformers passes it)."""
    import torch

    heads, kv, head_dim = arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]
    q = torch.randn(1, heads, 1024, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, kv, 1024, head_dim, device=device, dtype=dtype)
    try:
        choice = torch._fused_sdp_choice(q, k, k, is_causal=True, enable_gqa=True)
        return torch.nn.attention.SDPBackend(choice).name
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        return f"unknown ({type(err).__name__})"


def run_generation_steps(steps: list[tuple], cpu_smoke: bool, emit) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from longctx.eval.generation import AdapterSwapper, Prompt, generate_batches
    from longctx.model.architecture import Architecture
    from longctx.model.loading import resolve_attn_implementation
    from longctx.planner.evaluation import evaluation_memory
    from longctx.settings import GenerationArguments

    cuda = torch.cuda.is_available() and not cpu_smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    arch = architecture(cpu_smoke, for_generation=True)
    attention = resolve_attn_implementation("auto")
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "tie_word_embeddings")
    config = Qwen3Config(**{k: arch[k] for k in keys}, max_position_embeddings=262144,
                         rope_theta=arch.get("rope_theta", 5000000), attn_implementation=attention)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        base = Qwen3ForCausalLM(config).eval()
    torch.set_default_dtype(default_dtype)
    with tempfile.TemporaryDirectory() as adapter:  # an adapter as training saves it, loaded as evaluation does
        lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=list(
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
        trained = get_peft_model(base, lora)
        trained.save_pretrained(adapter)
        model = AdapterSwapper(trained.unload()).activate(adapter)
    lora_params = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    kernel = sdpa_kernel(arch, device, dtype) if cuda else "cpu"
    calls: list[float] = []

    def stamp(*_args):  # lm_head runs once for the prefill's last position, then once per decode step
        if cuda:
            torch.cuda.synchronize()
        calls.append(time.perf_counter())

    model.get_output_embeddings().register_forward_hook(stamp)
    for _, name, tokens, _ in steps:
        prompt_tokens = tokens - NEW_TOKENS  # prompt + new tokens within the model's 262,144 positions
        ids = torch.randint(0, 150_000, (prompt_tokens,)).tolist()
        prompts = [Prompt(name, ids, "", 0)]
        row = {"step": name, "tokens": tokens, "prompt_tokens": prompt_tokens, "max_new_tokens": NEW_TOKENS,
               "attention": attention, "sdpa_kernel": kernel,
               "adapter_dtype": str(next(p.dtype for n, p in model.named_parameters() if "lora_" in n))}
        calls.clear()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            generate_batches(model, tokenizer, prompts, [[0]], GenerationArguments(max_new_tokens=NEW_TOKENS), [])
            row.update(status="ok", prefill_seconds=round(calls[0] - start, 3),
                       decode_tokens_per_second=round((len(calls) - 1) / max(calls[-1] - calls[0], 1e-9), 1))
        except torch.OutOfMemoryError as err:
            row.update(status="oom", error=str(err).splitlines()[0][:300])
        if cuda:
            row["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            row["max_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        planned = evaluation_memory(Architecture.from_config(arch, "gpu_check"), prompt_tokens, NEW_TOKENS,
                                    weight_bytes=2 if cuda else 4, lora_params=lora_params)
        row["planned_peak_gib"] = round(planned.peak_bytes / GIB, 2)
        emit(row)


def run_cuda_tests(steps: list[tuple], cpu_smoke: bool, emit) -> None:
    files = ["tests/model/test_attention_cuda.py", "tests/planner/test_host.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-n", "0", "-q", "-p", "no:cacheprovider",
                           *files], cwd=REPO_ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    emit({"step": steps[0][1], "status": "ok" if proc.returncode == 0 else "failed", "pytest": summary.strip("= "),
          **({} if proc.returncode == 0 else {"error": proc.stdout[-2000:]})})


GROUP_RUNNERS = {"lora": run_lora_steps, "baseline": run_lora_steps, "generate": run_generation_steps,
                 "cuda_tests": run_cuda_tests}


def child(group: str, names: list[str], cpu_smoke: bool) -> int:
    steps = [smoke(step) if cpu_smoke else step for step in STEPS if step[1] in names]

    fault = dict(item.split(":") for item in os.environ.get("GPU_CHECK_FAULT", "").split(",") if item)

    def emit(row: dict) -> None:
        action = fault.get(row["step"])  # GPU_CHECK_FAULT=step:hang|exit: the harness's own test (a stuck step)
        if action == "hang":
            threading.Event().wait()
        if action == "exit":
            os._exit(3)
        print("ROW " + json.dumps(row), flush=True)

    GROUP_RUNNERS[group](steps, cpu_smoke, emit)
    return 0


def smoke(step: tuple) -> tuple:
    group, name, tokens, _ = step
    return group, name, SMOKE_TOKENS.get(tokens, tokens), SMOKE_STEP


# --- the harness --------------------------------------------------------------------------------------------------

def run_group(group: str, steps: list[tuple], args, env: dict, out) -> list[dict]:
    """The group's steps in a child process, each within its time; a step that fails or runs out of time is
    reported, the process stopped, and the steps after it run in a fresh one."""
    rows, remaining = [], list(steps)
    while remaining:
        command = [sys.executable, __file__, "--child", group, "--steps", ",".join(s[1] for s in remaining)]
        command += ["--cpu-smoke"] if args.cpu_smoke else []
        log = open(Path(args.out) / f"{group}.log", "a")
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=forward_lines, args=(proc.stdout, lines), daemon=True).start()
        startup = SMOKE_STARTUP if args.cpu_smoke else STARTUP
        for index, (_, name, tokens, seconds) in enumerate(remaining):
            row = wait_for_row(lines, name, time.monotonic() + seconds + (startup if index == 0 else 0))
            if row is None or row is OUTPUT_ENDED:  # out of time, or the process ended without this step's line
                ended = proc.poll()
                if row is OUTPUT_ENDED:  # its output ends a moment before its status can be read: wait for it
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        ended = proc.wait(timeout=10)
                row = {"step": name, "tokens": tokens, "status": "timeout" if ended is None else "error",
                       "error": f"no result within {seconds + (startup if index == 0 else 0)} s" if ended is None
                       else f"the process ended with status {ended} (see {group}.log)"}
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row), flush=True)
            if row["status"] in ("timeout", "error"):
                break
        remaining = remaining[index + 1:] if row["status"] in ("timeout", "error") else []
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait()
        log.close()
    return rows


def forward_lines(stream, lines: queue.Queue) -> None:
    """The child's output line by line, then None at its end (read on a thread: the harness waits with a deadline)."""
    for line in stream:
        lines.put(line)
    lines.put(None)


OUTPUT_ENDED: dict = {}  # wait_for_row's answer when the child's output ended without the step's line


def wait_for_row(lines: queue.Queue, name: str, deadline: float) -> dict | None:
    """The step's row; None when the deadline passed first; OUTPUT_ENDED when the child's output ended first."""
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            return None
        if line is None:
            return OUTPUT_ENDED
        if line.startswith("ROW "):
            row = json.loads(line[4:])
            if row["step"] == name:
                return row


def device_name() -> str:
    """The GPU as nvidia-smi names it (its driver too), or the CPU smoke run's name."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        return out[0] if out else "no GPU (nvidia-smi found none)"
    except (OSError, subprocess.TimeoutExpired):
        return "no GPU (no nvidia-smi)"


def environment(installed: list[str], command: str, cpu_smoke: bool) -> dict:
    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "flash-attn"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"step": "environment", "device": "cpu (smoke)" if cpu_smoke else device_name(),
            "torch_cuda": torch.version.cuda, "python": sys.version.split()[0], "versions": versions,
            "installed_from_wheels": installed, "PYTORCH_ALLOC_CONF": os.environ.get("PYTORCH_ALLOC_CONF"),
            "command": command}


def markdown(rows: list[dict], env_row: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env_row["versions"].items() if v)
    lines = [f"Device: {env_row['device']}; {versions}; CUDA {env_row['torch_cuda']}; PYTORCH_ALLOC_CONF="
             f"{env_row['PYTORCH_ALLOC_CONF']}; from wheels: {', '.join(env_row['installed_from_wheels']) or 'none'}.",
             f"Command: `{env_row['command']}`", "",
             "| step | tokens | status | peak allocated GiB | peak reserved GiB | planned GiB | planned / allocated "
             "| seconds | notes |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        allocated, planned = r.get("max_memory_allocated_gib"), r.get("planned_peak_gib")
        ratio = f"{planned / allocated:.2f}" if allocated and planned else ""
        seconds = r.get("seconds", r.get("prefill_seconds", ""))
        notes = []
        for key in ("mfu", "tokens_per_second", "decode_tokens_per_second", "sdpa_kernel", "adapter_dtype",
                    "peak_rss_gib", "pytest", "error"):
            if r.get(key) not in (None, ""):
                notes.append(f"{key} {r[key]}")
        lines.append(f"| {r['step']} | {r.get('tokens', '') or ''} | {r['status']} | {allocated or ''} | "
                     f"{r.get('max_memory_reserved_gib', '') or ''} | {planned or ''} | {ratio} | {seconds} | "
                     f"{'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def pinned_requirements() -> list[tuple[str, str]]:
    pins = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins.append((name.strip(), version.strip()))
    return pins


def download_wheels(directory: Path) -> int:
    """The wheels of gpu_check_requirements.txt for the GPU machine's Python 3.12 on x86-64 (deepspeed, which ships
    only a source archive, built here without its ops); prints each with its size; 2 when they exceed the limit."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, version in pinned_requirements():
        if name == "deepspeed":
            command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                       str(directory), f"{name}=={version}"]
            subprocess.run(command, check=True, env=dict(os.environ, DS_BUILD_OPS="0"))
            continue
        platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                     for arg in ("--platform", tag)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(directory),
                        f"{name}=={version}"], check=True)
    total = 0
    for wheel in sorted(directory.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.name}  {wheel.stat().st_size / 2**20:.2f} MiB")
    print(f"total {total / 2**20:.2f} MiB (limit {WHEELS_LIMIT_BYTES / 2**20:.0f} MiB); torch stays the GPU "
          f"machine's own CUDA build")
    return 2 if total > WHEELS_LIMIT_BYTES else 0


def wheels_to_install(directory: Path) -> list[tuple[Path, str]]:
    """The carried wheels whose package this Python lacks or has at another version, each with 'name version (was
    ...)'; torch is never carried."""
    chosen = []
    for wheel in sorted(Path(directory).glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            present = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            present = None
        if present != version:
            chosen.append((wheel, f"{name} {version} (was {present or 'absent'})"))
    return chosen


def install_wheels(directory: Path, site: Path) -> list[str]:
    """wheels_to_install, installed into `site` (put first on the children's path); their descriptions."""
    chosen = wheels_to_install(directory)
    if chosen:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), *(str(wheel) for wheel, _ in chosen)], check=True)
    return [text for _, text in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "gpu_check"), help="Where the results go.")
    parser.add_argument("--cpu-smoke", action="store_true", help="The same steps at tiny sizes on the CPU.")
    parser.add_argument("--wheels", default=None, help="A folder of carried wheels to install first (GPU machine).")
    parser.add_argument("--download-wheels", default=None, help="Download the wheels into this folder, then exit.")
    parser.add_argument("--only", nargs="+", default=None, help="Run only these steps (names as listed above).")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.steps.split(","), args.cpu_smoke)
    if args.download_wheels:
        return download_wheels(Path(args.download_wheels))

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run on a GPU machine, or add --cpu-smoke to run the steps on this CPU.",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    conf = env.get("PYTORCH_ALLOC_CONF") or env.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    env["PYTORCH_ALLOC_CONF"] = conf if "expandable_segments" in conf else ",".join(
        filter(None, [conf, "expandable_segments:True"]))  # as the launchers set it (scripts/common.sh)
    if args.cpu_smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
        env["DS_ACCELERATOR"] = "cpu"
    installed = []
    if args.wheels:
        site = out_dir / "site"
        installed = install_wheels(Path(args.wheels), site)
        env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    os.environ["PYTORCH_ALLOC_CONF"] = env["PYTORCH_ALLOC_CONF"]
    command = "bash scripts/gpu_check.sh " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows = []
    with (out_dir / "gpu_check.jsonl").open("w") as out:
        for group in dict.fromkeys(step[0] for step in STEPS):
            steps = [s for s in STEPS if s[0] == group and (not args.only or s[1] in args.only)]
            if steps:
                rows += run_group(group, [smoke(s) if args.cpu_smoke else s for s in steps], args, env, out)
        env_row = environment(installed, command.strip(), args.cpu_smoke)
        out.write(json.dumps(env_row) + "\n")
    table = markdown(rows, env_row)
    (out_dir / "gpu_check.md").write_text(table)
    print(table)
    failed = [r["step"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"error: {len(failed)} step(s) did not pass: {', '.join(failed)}; see {out_dir}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
