"""main(): settings and data checks -> run directory -> data -> model + LoRA -> Trainer.train -> verified adapter
save -> clean teardown, the end of the run under the hang watchdog.

Experiments call `main()` from their train_cluster.py; launchers start one process per GPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import enable_full_determinism

from . import checkpoints
from .callbacks import END_OF_RUN, ManifestCallback, WatchdogCallback
from .chat import check_template
from .checkpoints import FINAL_ADAPTER
from .collate import PadCollator
from .config import ConfigError, by_type, parse_config, resolved_config, validate
from .data import tokenize_split, write_length_report
from .distributed import cpu_process_group_args, is_main_process, print0, teardown
from .modeling import (apply_lora, apply_memory_switches, load_base_model, load_tokenizer, resolve_attn_implementation,
                       resolve_dtype)
from .records import BAD_RECORDS_REPORT, DataError, check_records, usable_copy
from .rundir import finish_wandb, git_commit, prepare_output_dir, write_run_info
from .settings import DataArguments, LoraArguments, MemoryArguments, ModelArguments, RunArguments
from .trainer import LongContextTrainer
from .watchdog import Watchdog


def parse_and_validate(argv: list[str] | None = None):
    """Config + data checks that need no weights. Exits with status 2 and a one-line reason on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv += cpu_process_group_args(argv)
    try:
        parsed, config_path, _ = parse_config(argv)
        validate(*parsed)
        data_args = by_type(parsed)[DataArguments]
        scans = {"train": check_records(data_args.train_file, data_args),
                 "validation": check_records(data_args.validation_file, data_args)}
        template = check_template(by_type(parsed)[ModelArguments], data_args)  # before any record is tokenized
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    return parsed, config_path, scans, template


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
    print0("bad records skipped (on_bad_record: skip): " + ", ".join(
        f"{split} {len(scan.problems)}" for split, scan in scans.items()) +
        f"; listed in {Path(output_dir) / BAD_RECORDS_REPORT}")


def save_final_adapter(trainer: Trainer, tokenizer, output_dir: str, commit: str | None) -> Path:
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
        checkpoints.write_manifest(tmp, trainer.state.global_step, commit)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        print0(f"final adapter saved and verified: {final}")
    trainer.accelerator.wait_for_everyone()
    return final


def main(argv: list[str] | None = None) -> None:
    parsed, config_path, scans, template = parse_and_validate(argv)
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
    git = git_commit()
    if is_main_process():
        write_run_info(output_dir, resolved_config(*parsed), config_path,
                       {"git": git, "attn_implementation": attn, "dtype": str(dtype), "resumed_from": resume_from,
                        **template})

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
    end_watchdog = Watchdog(run_args.watchdog_timeout_seconds, "watchdog_timeout_seconds")
    trainer = LongContextTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id, data_args.pad_to_multiple_of),
        processing_class=tokenizer,
        callbacks=[ManifestCallback(git["commit"]), WatchdogCallback(run_args.step_timeout_seconds, end_watchdog)],
    )
    trainer.train(resume_from_checkpoint=resume_from)

    if end_watchdog.armed_for is None:  # no step ran (resumed at the end): guard the rest all the same
        end_watchdog.arm(END_OF_RUN)
    save_final_adapter(trainer, tokenizer, output_dir, git["commit"])
    finish_wandb(output_dir)
    teardown()
    end_watchdog.disarm()
    print0("training finished")
