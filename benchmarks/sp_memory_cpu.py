"""CPU proxy of what Ulysses sequence parallelism saves per rank: peak RSS of one training step at 16,384 tokens,
one process (sequence_parallel_size 1) vs two processes sharing the sample (sequence_parallel_size 2).

    python benchmarks/sp_memory_cpu.py                 # SP 1 then SP 2, 16,384 tokens, the ratio last
    python benchmarks/sp_memory_cpu.py --sp-sizes 2 --seq-len 4096

Each configuration is the real training, launched as a user would: scripts/launch_train.sh (preflight, accelerate
launch, longctx.train, LongContextTrainer) with DeepSpeed ZeRO-2 (000's ds_config_zero2.json) in fresh processes,
max_steps 1 on a sample of exactly --seq-len tokens; SP 2 goes through accelerate's ParallelismConfig
(sp_backend "deepspeed") and DeepSpeed's Ulysses attention and dataloader adapter, as in training. Both use one
thread per process (OMP_NUM_THREADS=1) and glibc's mmap threshold fixed at 1 MiB (memory_cpu.child_env).
Model: memory_cpu.py's (random-init Qwen3, hidden 256, 4 layers, 4 heads / 1 KV head, head_dim 64, MLP 1024,
vocabulary 151,936, tied, fp32, SDPA), saved once and loaded by every run; LoRA r=16 / alpha 32 / dropout 0.05 on
all seven projections, non-reentrant activation checkpointing, the project's loss (logits at label positions only).
1 KV head with SP 2 is allowed: DeepSpeed's Ulysses attention replicates KV heads when the SP size is a multiple of
their count (validation accepts it too). Data: the real Qwen3 tokenizer (tests/fixtures) and 009's chat template;
documents of one-token words cut to fit (length_policy truncate_document), summaries of SUMMARY_TOKENS - 1 words +
the end-of-turn token, so the last 256 tokens are labels, as in memory_cpu.py (rank 1 holds all of them under SP 2).
Measurement (a callback in every rank, added by this file's train_cluster.py): the RSS when the Trainer is built
(`model_loaded`: Python, libraries, weights + LoRA; the weights are read once first, see MeasuredTrainer), at the
step's start (`baseline`: + DeepSpeed engine, process groups, Ulysses attention, data) and the lifetime peak so far
(`load_peak`); then the peak is reset (`echo 5 > /proc/self/clear_refs`: VmHWM := VmRSS) and read at the step's end
(`step_peak`: forward, backward, ZeRO-2 reduction, optimizer); `step_delta` = step_peak - baseline.
Output: one JSON line per rank (sp, rank, model_loaded / baseline / load_peak / step_peak / step_delta GiB, loss,
tokens and label tokens of the sample), then one line with the launches' wall seconds and the ratios of SP 2's
largest rank over SP 1, of the step peak (the goal: <= 0.6) and of the step delta.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_cpu import GIB, LORA, REPO_ROOT, SUMMARY_TOKENS, child_env, qwen3_config  # noqa: E402

TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "qwen3-4b-instruct-2507"
CHAT_TEMPLATE = REPO_ROOT / "experiments" / "009_text_summary" / "qwen3-4b-instruct-2507.plain.jinja"
DS_CONFIG = REPO_ROOT / "experiments" / "000_tiny_smoke" / "ds_config_zero2.json"
# each " word" is one token of Qwen's BPE (checked: the length report gives the summary's tokens)
WORDS = "court case law the of and judge appeal claim party order notice evidence contract damages statute".split()
RESULT = "sp_memory_rank{rank}.json"


def proc_status_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024 / GIB  # kB


def measure_step() -> None:
    """In a rank process, before longctx.train.main: every LongContextTrainer the run builds gets StepPeak."""
    from transformers import TrainerCallback

    import longctx.train
    from longctx.utils.atomic_write import write_atomic

    class StepPeak(TrainerCallback):
        def __init__(self):
            self.row: dict = {}

        def on_step_begin(self, args, state, control, **kwargs):
            if "baseline_gib" not in self.row:
                self.row.update(baseline_gib=proc_status_gib("VmRSS"), load_peak_gib=proc_status_gib("VmHWM"))
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # the high-water mark restarts from the RSS now

        def on_step_end(self, args, state, control, **kwargs):
            if "step_peak_gib" not in self.row:
                self.row["step_peak_gib"] = proc_status_gib("VmHWM")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.row.setdefault("loss", logs["loss"])

        def on_train_end(self, args, state, control, **kwargs):
            row = {k: round(v, 4) for k, v in self.row.items()}
            row["step_delta_gib"] = round(self.row["step_peak_gib"] - self.row["baseline_gib"], 4)
            rank = int(os.environ.get("RANK", "0"))
            write_atomic(Path(args.output_dir) / RESULT.format(rank=rank), json.dumps({"rank": rank, **row}))

    base = longctx.train.LongContextTrainer

    class MeasuredTrainer(base):
        def __init__(self, *args, **kwargs):
            # transformers maps the safetensors file: a weight's pages enter the RSS when first read, in the step
            # (SP 1) or in DeepSpeed's broadcast of the weights over the SP group at initialisation (SP 2). Read
            # them all now, as a GPU run copies them to the device, so that both baselines hold them.
            for param in kwargs["model"].parameters():
                param.detach().sum()
            callback = StepPeak()
            callback.row["model_loaded_gib"] = proc_status_gib("VmRSS")  # weights + LoRA, before DeepSpeed
            super().__init__(*args, **kwargs)
            self.add_callback(callback)

    longctx.train.LongContextTrainer = MeasuredTrainer


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def build_experiment(work: Path, seq_len: int, seed: int) -> Path:
    """work/model (random-init, saved once), work/data (2 training records, 1 validation), work/exp (config.yaml
    + train_cluster.py that measures)."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    Qwen3ForCausalLM(qwen3_config(seq_len)).save_pretrained(work / "model")
    rng = random.Random(seed)
    data = work / "data"
    data.mkdir()
    for split, count, doc_words in (("train", 2, seq_len + 1000), ("validation", 1, 100)):
        with (data / f"{split}.jsonl").open("w") as f:
            for i in range(count):
                f.write(json.dumps({"id": f"{split}-{i}", "document": words(rng, doc_words),
                                    "summary": "the " + words(rng, SUMMARY_TOKENS - 2)}) + "\n")
    exp = work / "exp"
    exp.mkdir()
    config = {
        "model_name_or_path": str(work / "model"), "tokenizer_name_or_path": str(TOKENIZER),
        "chat_template": str(CHAT_TEMPLATE), "attn_implementation": "sdpa", "torch_dtype": "float32",
        "train_file": str(data / "train.jsonl"), "validation_file": str(data / "validation.jsonl"),
        "document_field": "document", "summary_field": "summary", "id_field": "id",
        "instruction": "Summarize the following legal document.", "max_seq_length": seq_len,
        "length_policy": "truncate_document", "max_eval_samples": 1,
        **LORA, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "tiled_mlp": False, "offload_activations": False,
        "max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
        "activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False},
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
        "dataloader_num_workers": 0, "disable_tqdm": True, "seed": seed,
    }
    (exp / "config.yaml").write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    (exp / "train_cluster.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import sp_memory_cpu\nsp_memory_cpu.measure_step()\n\nimport longctx.train\n\nlongctx.train.main()\n")
    return exp


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(exp: Path, out: Path, sp: int) -> tuple[list[dict], float]:
    """One training launch of `sp` processes; each rank's row and the launch's wall seconds."""
    env = child_env(NUM_PROCESSES=str(sp), USE_DEEPSPEED="1", DS_CONFIG=str(DS_CONFIG), OUTPUT_DIR=str(out),
                    MASTER_PORT=free_port(), OMP_NUM_THREADS="1", PLAN="0", WANDB_MODE="disabled",
                    HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(out.parent / "datasets_cache"))
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "launch_train.sh"), str(exp),
                           "--sequence_parallel_size", str(sp)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"SP {sp}: the launch exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    report = [json.loads(line) for line in (out / "length_report.jsonl").read_text().splitlines()]
    train = next(row for row in report if row["split"] == "train")
    tokens = {"seq_len": train["prompt_tokens"] + train["summary_tokens"], "label_tokens": train["summary_tokens"]}
    rows = [{"sp": sp, **json.loads((out / RESULT.format(rank=r)).read_text()), **tokens} for r in range(sp)]
    return rows, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16384, help="Tokens of the sample (prompt + summary).")
    parser.add_argument("--sp-sizes", type=int, nargs="+", default=[1, 2], help="Processes sharing the sample.")
    parser.add_argument("--workdir", type=Path, default=None, help="Model, data and runs (default: a temp folder, "
                        "removed at the end).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="sp_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        exp = build_experiment(work, args.seq_len, args.seed)
        peaks, seconds = {}, {}
        for sp in args.sp_sizes:
            rows, seconds[sp] = launch(exp, work / f"run_sp{sp}", sp)
            for row in rows:
                print(json.dumps(row), flush=True)
            peaks[sp] = max(rows, key=lambda row: row["step_peak_gib"])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {"launch_seconds": {str(sp): round(s, 1) for sp, s in seconds.items()}}
    if 1 in peaks:
        for sp in (sp for sp in peaks if sp > 1):
            summary[f"sp{sp}_over_sp1"] = {
                key: round(peaks[sp][f"{key}_gib"] / peaks[1][f"{key}_gib"], 3) for key in ("step_peak", "step_delta")}
            summary[f"sp{sp}_step_peak_le_0.6x_sp1"] = summary[f"sp{sp}_over_sp1"]["step_peak"] <= 0.6
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
