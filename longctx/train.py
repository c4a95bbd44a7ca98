"""main(): config -> data -> model + LoRA -> Trainer.train -> verified adapter save -> clean teardown.

Experiments call `main()` from their train_cluster.py; launchers start one process per GPU.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
import yaml
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import enable_full_determinism

from . import checkpoints
from .checkpoints import FINAL_ADAPTER
from .callbacks import (ManifestCallback, NonFiniteLossError, StepWatchdogCallback, ThroughputMeter, Watchdog,
                        gpu_memory, perplexity)
from .collate import PadCollator
from .config import (ConfigError, DataArguments, LoraArguments, MemoryArguments, ModelArguments, RunArguments, by_type,
                     parse_config, resolved_config, validate)
from .data import (BAD_RECORDS_REPORT, LENGTH_REPORT, DataError, check_records, tokenize_split, usable_copy,
                   write_length_report)
from .distributed import deepspeed_on_cpu_args, is_main_process, print0, teardown
from .loss import summary_loss
from .modeling import apply_lora, load_base_model, load_tokenizer, resolve_attn_implementation, resolve_dtype
from .tiling import apply_memory_switches

PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "wandb", "rouge-score",
            "flash-attn")


class LongContextTrainer(Trainer):
    """The HF Trainer with the project's loss (label positions only) and extra log fields."""

    loss_is_scaled_for_ga = True  # summary_loss divides by the label tokens of the whole optimizer step

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Ask the Trainer to count label tokens per optimizer step (num_items_in_batch), shifted as our loss is.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.throughput = ThroughputMeter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, _ = summary_loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's labels, and DDP / ZeRO average gradients over processes.
            loss = loss * self.accelerator.num_processes
        if model.training:
            self.throughput.add(int(inputs["attention_mask"].sum()))
            self._stop_on_nonfinite(loss)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _stop_on_nonfinite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"non-finite training loss at step {self.state.global_step + 1} (this process: {loss.item()}); "
                f"stopped before the optimizer step, so no checkpoint holds it. Lower learning_rate, check the "
                f"data around this step, or resume from the last checkpoint.")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            rate = self.throughput.take()
            if rate is not None:
                logs["tokens_per_second_per_gpu"] = round(rate, 1)
            memory = gpu_memory()
            if memory is not None:
                logs.update(memory[0])
                print0(f"step {self.state.global_step}: {memory[1]}")
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        super().log(logs, start_time)


def parse_and_validate(argv: list[str] | None = None):
    """Config + data checks that need no weights. Exits with status 2 and a one-line reason on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv += deepspeed_on_cpu_args(argv)
    try:
        parsed, config_path, _ = parse_config(argv)
        validate(*parsed)
        data_args = by_type(parsed)[DataArguments]
        scans = {"train": check_records(data_args.train_file, data_args),
                 "validation": check_records(data_args.validation_file, data_args)}
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    return parsed, config_path, scans


def use_usable_records(scans: dict, data_args, output_dir: str) -> None:
    """Under on_bad_record: skip, train on copies without the skipped records (OUTPUT_DIR/data_usable/) and list
    them in OUTPUT_DIR/bad_records.jsonl. The copies' paths go into run_config.yaml, so evaluation reads them too."""
    problems = [p for scan in scans.values() for p in scan.problems]
    if not problems:
        return
    usable_dir = Path(output_dir) / "data_usable"
    if is_main_process():
        with (Path(output_dir) / BAD_RECORDS_REPORT).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in problems)
    for split, attr in (("train", "train_file"), ("validation", "validation_file")):
        if scans[split].problems:  # rank 0 writes the copy (main_process_first), every rank reads it
            copy = usable_copy(scans[split], usable_dir) if is_main_process() else usable_dir / scans[split].path.name
            setattr(data_args, attr, str(copy))
    print0(f"bad records skipped (on_bad_record: skip): " + ", ".join(
        f"{split} {len(scan.problems)}" for split, scan in scans.items()) +
        f"; listed in {Path(output_dir) / BAD_RECORDS_REPORT}")


def prepare_output_dir(run, output_dir: str) -> str | None:
    """Apply resume / overwrite to output_dir; returns the checkpoint to resume from, if any."""
    out = Path(output_dir)
    existing = sorted(out.glob("checkpoint-*")) + ([out / FINAL_ADAPTER] if (out / FINAL_ADAPTER).exists() else [])
    if run.resume == "auto":
        latest = checkpoints.latest_resumable(out, warn=print0)
        if latest:
            print0(f"resuming from {latest.path} (step {latest.global_step}); RESUME=never starts afresh")
            return str(latest.path)
        return None
    if existing and not run.overwrite:
        print(f"error: setting 'resume' = 'never' but output_dir {out} already holds {existing[0].name}; "
              f"set RESUME=auto to continue that run, OVERWRITE=1 to delete it and start afresh, or choose "
              f"another OUTPUT_DIR.", file=sys.stderr, flush=True)
        sys.exit(2)
    if existing and is_main_process():
        for path in existing:
            shutil.rmtree(path)
        for name in ("eval_results.jsonl", LENGTH_REPORT, BAD_RECORDS_REPORT):
            (out / name).unlink(missing_ok=True)
        print0(f"overwrite: removed {len(existing)} checkpoint(s) and reports from {out}")
    return None


def _git_commit() -> dict[str, str | bool | None]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                                    text=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_info(output_dir: str, config: dict, config_path: str | None, extra: dict) -> None:
    """OUTPUT_DIR/run_config.yaml (every setting's final value) and run_info.json (commit, versions, command)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")
    info = {"packages": package_versions(), "python": platform.python_version(),
            "command": [sys.executable, *sys.argv], "config_file": config_path,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), **extra}
    (out / "run_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def save_final_adapter(trainer: Trainer, tokenizer, output_dir: str, git_commit: str | None) -> Path:
    """Rank 0 writes OUTPUT_DIR/final_adapter (peft save_pretrained, safetensors + tokenizer), reloads and checks
    every LoRA tensor, writes manifest.json (sizes, sha256, step, commit), and only then moves it into place;
    every rank then meets at a barrier."""
    final = Path(output_dir) / FINAL_ADAPTER
    if trainer.is_world_process_zero():
        tmp = final.with_name(f".{FINAL_ADAPTER}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        checkpoints.verify_adapter(tmp, model)
        (tmp / "final_state.json").write_text(json.dumps({"global_step": trainer.state.global_step}))
        checkpoints.write_manifest(tmp, trainer.state.global_step, git_commit)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        print0(f"final adapter saved and verified: {final}")
    trainer.accelerator.wait_for_everyone()
    return final


def _finish_wandb(output_dir: str) -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        if is_main_process():
            (Path(output_dir) / "wandb_run.json").write_text(json.dumps(
                {"id": wandb.run.id, "project": wandb.run.project, "name": wandb.run.name,
                 "dir": wandb.run.dir}))
        wandb.finish()


def main(argv: list[str] | None = None) -> None:
    parsed, config_path, scans = parse_and_validate(argv)
    args = by_type(parsed)
    model_args, data_args, lora_args = args[ModelArguments], args[DataArguments], args[LoraArguments]
    run_args, training_args = args[RunArguments], args[TrainingArguments]
    output_dir = training_args.output_dir
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)
    attn = resolve_attn_implementation(model_args.attn_implementation)
    dtype = resolve_dtype(model_args.torch_dtype)
    print0(f"attention: {attn}; weights: {str(dtype).replace('torch.', '')}; processes: "
           f"{training_args.world_size}; max_seq_length: {data_args.max_seq_length}")
    with training_args.main_process_first(desc="output_dir"):
        resume_from = training_args.resume_from_checkpoint or prepare_output_dir(run_args, output_dir)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    with training_args.main_process_first(desc="bad records"):
        use_usable_records(scans, data_args, output_dir)
    git = _git_commit()
    if is_main_process():
        write_run_info(output_dir, resolved_config(*parsed), config_path,
                       {"git": git, "attn_implementation": attn, "dtype": str(dtype), "resumed_from": resume_from})

    tokenizer = load_tokenizer(model_args)
    with training_args.main_process_first(desc="tokenize"):
        train_ds, train_report = tokenize_split(data_args.train_file, "train", tokenizer, data_args,
                                                data_args.max_train_samples)
        eval_ds, eval_report = tokenize_split(data_args.validation_file, "validation", tokenizer, data_args,
                                              data_args.max_eval_samples)
    if is_main_process():
        counts = {split: min(scan.count, limit or scan.count) for (split, scan), limit in
                  zip(scans.items(), (data_args.max_train_samples, data_args.max_eval_samples))}
        print0(write_length_report(train_report + eval_report, output_dir, counts))

    model = apply_lora(load_base_model(model_args), lora_args)
    for line in apply_memory_switches(model, args[MemoryArguments], training_args):
        print0(line)
    if is_main_process():
        model.print_trainable_parameters()
    callbacks = [ManifestCallback(git["commit"])]
    if run_args.step_timeout_seconds:
        callbacks.append(StepWatchdogCallback(run_args.step_timeout_seconds))
    trainer = LongContextTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id, data_args.pad_to_multiple_of),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume_from)

    watchdog = Watchdog(run_args.watchdog_timeout_seconds)
    watchdog.arm("final adapter save and teardown")
    save_final_adapter(trainer, tokenizer, output_dir, git["commit"])
    _finish_wandb(output_dir)
    teardown()
    watchdog.disarm()
    print0("training finished")
