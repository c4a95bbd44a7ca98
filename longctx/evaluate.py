"""Score one checkpoint, or every complete checkpoint of a run, with ROUGE.

    python experiments/009_text_summary/eval_checkpoint.py --config experiments/009_text_summary/config.yaml \
        --checkpoint runs/009_text_summary/checkpoint-200
    bash experiments/009_text_summary/eval_all_checkpoints.sh          # --all_checkpoints over OUTPUT_DIR

The base model is loaded once; each checkpoint's LoRA adapter is loaded, made active, used, and deleted. For every
validation record the prompt alone (chat template + generation prompt) is generated from greedily, in batches of
similar length with left padding. Predictions go to CHECKPOINT/eval_predictions.jsonl, one results row per
checkpoint is appended to OUTPUT_DIR/eval_results.jsonl, and a table by step is printed with the best marked.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments

from . import checkpoints
from .collate import PadCollator
from .config import (ConfigError, DataArguments, GenerationArguments, LoraArguments, ModelArguments, parse_config,
                     validate_data)
from .data import DataError, check_records, encode_prompt, fit_document, load_records
from .distributed import print0
from .metrics import ROUGE_TYPES, rouge
from .modeling import load_base_model, load_tokenizer

RESULTS_FILE = "eval_results.jsonl"
PREDICTIONS_FILE = "eval_predictions.jsonl"


@dataclass
class EvalArguments:
    run_dir: str | None = field(
        default=None, metadata={"help": "Training output directory to score (default: output_dir of the config)."}
    )
    checkpoint: str | None = field(default=None, metadata={"help": "One adapter directory to score."})
    report_to: list[str] = field(
        default_factory=list, metadata={"help": "As in training: 'wandb' logs ROUGE per checkpoint to W&B."}
    )
    run_name: str | None = field(default=None, metadata={"help": "As in training: names the W&B run group."})
    all_checkpoints: bool = field(
        default=False, metadata={"help": "Score every complete checkpoint-N of run_dir in step order, then "
                                         "final_adapter."}
    )


@dataclass
class Prompt:
    id: str
    input_ids: list[int]
    reference: str


def build_prompts(tokenizer, data: DataArguments) -> tuple[list[Prompt], int]:
    """Validation prompts under the length policy; returns (prompts, number dropped for length)."""
    records = load_records(data.validation_file, "validation", data.max_eval_samples)
    prompts, dropped = [], 0
    for index, record in enumerate(records):
        document = record[data.document_field]
        ids = encode_prompt(tokenizer, document, data)
        if len(ids) > data.max_seq_length:
            fitted = None
            if data.length_policy == "truncate_document":
                fitted = fit_document(tokenizer, document, data, data.max_seq_length,
                                      lambda doc: len(encode_prompt(tokenizer, doc, data)))
            if fitted is None:
                dropped += 1
                continue
            ids = encode_prompt(tokenizer, fitted[0], data)
        record_id = record.get(data.id_field)
        prompts.append(Prompt(f"validation:{index}" if record_id is None else str(record_id), ids,
                              record[data.summary_field]))
    return prompts, dropped


@torch.no_grad()
def generate(model, tokenizer, prompts: list[Prompt], gen: GenerationArguments) -> list[str]:
    """Greedy generation, batches of similar length, left padded; returns predictions in the prompts' order."""
    device = next(model.parameters()).device
    collate = PadCollator(tokenizer.pad_token_id, padding_side="left")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].input_ids))
    predictions: list[str] = [""] * len(prompts)
    for start in range(0, len(order), gen.generation_batch_size):
        chunk = order[start:start + gen.generation_batch_size]
        batch = collate([{"input_ids": prompts[i].input_ids} for i in chunk])
        output = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=gen.max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            predictions[i] = text.strip()
    return predictions


def append_row(path: Path, row: dict) -> None:
    """One whole line per write, flushed to disk: a killed run leaves complete rows only."""
    line = (json.dumps(row) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def format_table(rows: list[dict]) -> str:
    """Results by step, the best ROUGE-Lsum marked with '*'."""
    if not rows:
        return "no results"
    rows = sorted(rows, key=lambda r: (r["global_step"], r["checkpoint"]))
    best = max(rows, key=lambda r: r["rougeLsum"])
    lines = [f"{'checkpoint':<24}{'step':>8}" + "".join(f"{m:>11}" for m in ROUGE_TYPES) + f"{'n':>6}"]
    for r in rows:
        mark = " *" if r is best else ""
        lines.append(f"{r['checkpoint']:<24}{r['global_step']:>8}" + "".join(f"{r[m]:>11.4f}" for m in ROUGE_TYPES)
                     + f"{r['num_examples']:>6}{mark}")
    lines.append(f"* best by rougeLsum: {best['checkpoint']} (step {best['global_step']})")
    return "\n".join(lines)


class WandbLogger:
    """Metrics against each checkpoint's training step, and a table of example predictions per checkpoint."""

    def __init__(self, run_dir: Path, run_name: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT"), name=f"{run_name or run_dir.name}-eval",
                              group=run_name or run_dir.name, job_type="eval", dir=str(run_dir))
        self.run.define_metric("train/global_step")
        self.run.define_metric("rouge/*", step_metric="train/global_step")

    def log(self, row: dict, prompts: list[Prompt], predictions: list[str]) -> None:
        table = self.wandb.Table(columns=["id", "prediction", "reference"],
                                 data=[[p.id, pred, p.reference] for p, pred in zip(prompts[:20], predictions)])
        self.run.log({"train/global_step": row["global_step"],
                      **{f"rouge/{m}": row[m] for m in ROUGE_TYPES},
                      f"predictions/{row['checkpoint']}": table})

    def finish(self) -> None:
        self.run.finish()


def score_checkpoints(ckpts: list[checkpoints.Checkpoint], model_args: ModelArguments, data: DataArguments,
                      gen: GenerationArguments, results_path: Path, wandb_logger: WandbLogger | None) -> list[dict]:
    from peft import PeftModel

    tokenizer = load_tokenizer(model_args, padding_side="left")
    prompts, dropped = build_prompts(tokenizer, data)
    if not prompts:
        raise DataError(f"{data.validation_file}: no validation prompt fits max_seq_length={data.max_seq_length}.")
    references = [p.reference for p in prompts]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_base_model(model_args, training=False).to(device).eval()
    model, previous, rows = None, None, []
    for ckpt in ckpts:
        start = time.perf_counter()
        name = ckpt.name.replace(".", "_")
        if model is None:
            model = PeftModel.from_pretrained(base, str(ckpt.path), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(ckpt.path), adapter_name=name, is_trainable=False)
            model.set_adapter(name)
            model.delete_adapter(previous)
        previous = name
        model.eval()
        predictions = generate(model, tokenizer, prompts, gen)
        with (ckpt.path / PREDICTIONS_FILE).open("w", encoding="utf-8") as f:
            for p, prediction in zip(prompts, predictions):
                f.write(json.dumps({"id": p.id, "prediction": prediction, "reference": p.reference}) + "\n")
        row = {"checkpoint": ckpt.name, "global_step": ckpt.global_step, **rouge(predictions, references),
               "num_examples": len(prompts), "num_dropped_for_length": dropped,
               "num_empty": sum(not p for p in predictions), "max_new_tokens": gen.max_new_tokens,
               "seconds": round(time.perf_counter() - start, 2)}
        append_row(results_path, row)
        rows.append(row)
        print0(f"{ckpt.name} (step {ckpt.global_step}): " + ", ".join(f"{m} {row[m]:.4f}" for m in ROUGE_TYPES))
        if wandb_logger:
            wandb_logger.log(row, prompts, predictions)
    return rows


def main(argv: list[str] | None = None) -> None:
    training_keys = {f for f in TrainingArguments.__dataclass_fields__}
    try:
        (model_args, data, _lora, gen, ev), config_path, extra = parse_config(
            argv, (ModelArguments, DataArguments, LoraArguments, GenerationArguments, EvalArguments),
            tolerated_keys=training_keys)
        validate_data(data, need_train=False)
        check_records(data.validation_file, data)
        run_dir = Path(ev.run_dir or extra.get("output_dir") or "")
        if ev.checkpoint:
            ckpt_path = Path(ev.checkpoint)
            problem = checkpoints.adapter_problem(ckpt_path)
            if problem:
                raise ConfigError(f"setting 'checkpoint' = {str(ckpt_path)!r}: {problem}")
            ckpts = [checkpoints.Checkpoint(ckpt_path, checkpoints.global_step_of(ckpt_path) or 0)]
            run_dir = Path(ev.run_dir) if ev.run_dir else ckpt_path.parent
        elif ev.all_checkpoints:
            if not run_dir.is_dir():
                raise ConfigError(f"setting 'run_dir' = {str(run_dir)!r}: no such directory; set OUTPUT_DIR (or "
                                  f"--run_dir) to the training run's output directory.")
            ckpts = checkpoints.find_checkpoints(run_dir, warn=print0)
            if not ckpts:
                raise ConfigError(f"setting 'run_dir' = {str(run_dir)!r}: holds no complete checkpoint yet.")
        else:
            raise ConfigError("setting 'checkpoint' is unset: pass --checkpoint DIR, or --all_checkpoints.")
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)

    logger = WandbLogger(run_dir, ev.run_name) if "wandb" in ev.report_to else None
    results_path = run_dir / RESULTS_FILE
    print0(f"scoring {len(ckpts)} checkpoint(s) of {run_dir} on {data.validation_file}")
    try:
        score_checkpoints(ckpts, model_args, data, gen, results_path, logger)
    finally:
        if logger:
            logger.finish()
    print0(format_table(read_results(results_path)))
    print0(f"results: {results_path}")
