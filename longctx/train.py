"""main(): settings and data checks -> run directory -> data -> model + LoRA -> Trainer.train -> verified adapter
save -> clean teardown, the end of the run under the hang watchdog.

Experiments call `main()` from their train_cluster.py; launchers start one process per GPU. However training ends,
the process exits with one documented status (longctx.status) and its one-line reason is the last line it prints:
0 finished, 1 failed, 2 bad setting / data / run directory, 75 stopped for a signal with a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import enable_full_determinism

from . import checkpoints, sequence_parallel, status
from .callbacks import END_OF_RUN, ManifestCallback, WatchdogCallback
from .chat import check_template
from .checkpoints import FINAL_ADAPTER
from .collate import PadCollator
from .config import ConfigError, by_type, parse_config, resolved_config, validate
from .data import tokenize_split, write_length_report
from .distributed import (cpu_process_group_args, deepspeed_comm_on_cpu, is_distributed, is_main_process,
                          on_rank_zero, print0, rank, teardown)
from .modeling import (apply_lora, apply_memory_switches, load_base_model, load_tokenizer, resolve_attn_implementation,
                       resolve_dtype)
from .offload import has_accelerator
from .planner.corpus import write_length_cache
from .preemption import Preempted, PreemptionCallback
from .quiet import silence_unactionable_warnings
from .records import BAD_RECORDS_REPORT, DataError, check_records, usable_copy
from .rundir import (SHARED_CHECK, check_output_dir, check_shared_output_dir, git_commit, run_identity, start_afresh,
                     write_run_info, write_shared_check)
from .settings import DataArguments, LoraArguments, MemoryArguments, ModelArguments, RunArguments
from .tracking import finish_wandb_run, start_wandb_run, wants_wandb
from .trainer import LongContextTrainer, NonFiniteError
from .watchdog import Watchdog


def use_usable_records(scans: dict, data_args, output_dir: str) -> None:
    """Under on_bad_record: skip, train on copies without the skipped records (OUTPUT_DIR/data_usable/) and list
    them in OUTPUT_DIR/bad_records.jsonl; rank 0 writes them (inside on_rank_zero). The copies' paths go into
    run_config.yaml, so evaluation reads them too."""
    problems = [p for scan in scans.values() for p in scan.problems]
    if not problems:
        return
    usable_dir = Path(output_dir) / "data_usable"
    if is_main_process():
        usable_dir.mkdir(parents=True, exist_ok=True)
        with (Path(output_dir) / BAD_RECORDS_REPORT).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in problems)
    for split, attr in (("train", "train_file"), ("validation", "validation_file")):
        if scans[split].problems:
            copy = usable_copy(scans[split], usable_dir) if is_main_process() else usable_dir / scans[split].path.name
            setattr(data_args, attr, str(copy))
    print0("bad records skipped (on_bad_record: skip): " + ", ".join(
        f"{split} {len(scan.problems)}" for split, scan in scans.items()) +
        f"; listed in {Path(output_dir) / BAD_RECORDS_REPORT}")


def prepare_run(parsed, config_path: str | None, template: dict[str, str]) -> dict:
    """One process for the whole job (global rank 0): read every record of the data files, decide what to do with
    OUTPUT_DIR (resume the same run, start afresh, or refuse), write the usable copies and the run's record. Every
    rank receives the verdict, or the same ConfigError / DataError."""
    args = by_type(parsed)
    data_args, run_args, training = args[DataArguments], args[RunArguments], args[TrainingArguments]
    out = Path(training.output_dir)
    scans = {"train": check_records(data_args.train_file, data_args),
             "validation": check_records(data_args.validation_file, data_args)}
    identity = run_identity(resolved_config(*parsed), training.world_size, template)
    resume_from = check_output_dir(run_args, str(out), identity, training.max_steps)
    if run_args.overwrite and out.is_dir():
        removed = start_afresh(out)
        if removed:
            print0(f"overwrite: removed {len(removed)} entries of the earlier run from {out}")
    out.mkdir(parents=True, exist_ok=True)
    use_usable_records(scans, data_args, str(out))
    if resume_from:
        print0(f"resuming from {resume_from} (step {checkpoints.global_step_of(Path(resume_from))}): the same data "
               f"and settings as the run's first launch; OVERWRITE=1 starts afresh")
    return {"scans": scans, "resume_from": resume_from, "identity": identity, "git": git_commit(),
            "train_file": data_args.train_file, "validation_file": data_args.validation_file,
            "shared_check": write_shared_check(str(out)) if is_distributed() else None}


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


def train(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv += cpu_process_group_args(argv)
    parsed, config_path, _ = parse_config(argv)
    validate(*parsed, world_size=int(os.environ.get("WORLD_SIZE", "1")),
             experiment_dir=Path(config_path).parent if config_path else None)
    args = by_type(parsed)
    template = check_template(args[ModelArguments], args[DataArguments])  # before any record is tokenized
    model_args, data_args, lora_args = args[ModelArguments], args[DataArguments], args[LoraArguments]
    run_args, training_args = args[RunArguments], args[TrainingArguments]
    output_dir = training_args.output_dir
    preemption = PreemptionCallback(run_args.save_every_minutes)
    preemption.install()  # from here on SIGTERM / SIGUSR1 mean: stop at the next optimizer step, with a checkpoint

    configured_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    run = on_rank_zero(lambda: prepare_run(parsed, config_path, template))
    data_args.train_file, data_args.validation_file = run["train_file"], run["validation_file"]
    if run["shared_check"]:
        check_shared_output_dir(output_dir, run["shared_check"])  # every rank has read the token (all-gather)
    if training_args.full_determinism:
        enable_full_determinism(training_args.seed)
    else:
        set_seed(training_args.seed)
    if not has_accelerator():
        training_args.dataloader_pin_memory = False  # nothing to pin for: torch would warn once per dataloader
    attn = resolve_attn_implementation(model_args.attn_implementation)
    dtype = resolve_dtype(model_args.torch_dtype)
    sp = args[MemoryArguments].sequence_parallel_size
    print0(f"attention: {attn}; weights: {str(dtype).replace('torch.', '')}; processes: "
           f"{training_args.world_size}; max_seq_length: {data_args.max_seq_length}"
           + (f"; sequence parallel: {sp} processes per sample" if sp > 1 else ""))
    if sp > 1:
        training_args.parallelism_config = sequence_parallel.parallelism_config(sp, training_args.world_size, attn)
        deepspeed_comm_on_cpu()
    config = resolved_config(*parsed)
    if is_main_process():
        write_run_info(output_dir, config, config_path,
                       {"git": run["git"], "attn_implementation": attn, "dtype": str(dtype),
                        "resumed_from": run["resume_from"], "identity": run["identity"], **template})
        if wants_wandb(training_args):
            start_wandb_run(output_dir, training_args.run_name,
                            {**config, **template, "git_commit": run["git"]["commit"], "git_dirty": run["git"]["dirty"],
                             "files_sha256": run["identity"]["files_sha256"], "world_size": training_args.world_size})
        (Path(output_dir) / SHARED_CHECK).unlink(missing_ok=True)

    tokenizer = load_tokenizer(model_args)
    # Global rank 0 tokenizes first and writes the datasets cache; the other ranks, on every machine, read it.
    with training_args.main_process_first(local=False, desc="tokenize"):
        train_ds, train_report = tokenize_split(data_args.train_file, "train", tokenizer, data_args,
                                                data_args.max_train_samples)
        eval_ds, eval_report = tokenize_split(data_args.validation_file, "validation", tokenizer, data_args,
                                              data_args.max_eval_samples)
    if is_main_process():
        counts = {split: min(scan.count, limit or scan.count) for (split, scan), limit in
                  zip(run["scans"].items(), (data_args.max_train_samples, data_args.max_eval_samples))}
        print0(write_length_report(train_report + eval_report, output_dir, counts))
        for split, dataset, report in (("train", train_ds, train_report), ("validation", eval_ds, eval_report)):
            # the plan of the next launch (PLAN=1, the preflight) reads the corpus's real lengths from it
            write_length_cache(output_dir, split, configured_files[split], model_args, data_args, dataset, report)

    model = apply_lora(load_base_model(model_args), lora_args)
    for line in apply_memory_switches(model, args[MemoryArguments], training_args):
        print0(line)
    if is_main_process():
        model.print_trainable_parameters()
    if preemption.requested is not None:
        raise Preempted(f"stopped for {preemption.requested.name} before the first optimizer step; relaunch the "
                        f"same command to start it again")
    end_watchdog = Watchdog(run_args.watchdog_timeout_seconds, "watchdog_timeout_seconds")
    trainer = LongContextTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PadCollator(tokenizer.pad_token_id, **sequence_parallel.collator_padding(
            sp, data_args.max_seq_length, data_args.pad_to_multiple_of, torch.cuda.is_available())),
        processing_class=tokenizer,
        # in this order: the preemption request decides whether this step is the last, the watchdog reads it
        callbacks=[ManifestCallback(run["git"]["commit"]), preemption,
                   WatchdogCallback(run_args.step_timeout_seconds, end_watchdog)],
    )
    trainer.train(resume_from_checkpoint=run["resume_from"])

    if end_watchdog.armed_for is None:  # no step ran (resumed at the end): guard the rest all the same
        end_watchdog.arm(END_OF_RUN)
    stopped = preemption.outcome()
    if stopped is None:
        save_final_adapter(trainer, tokenizer, output_dir, run["git"]["commit"])
    finish_wandb_run(preempted=stopped is not None)
    teardown()
    end_watchdog.disarm()
    if stopped is not None:
        raise stopped
    print0("training finished")


def main(argv: list[str] | None = None) -> None:
    """train(), and every way it ends as an exit status with its reason as the last line (longctx.status)."""
    silence_unactionable_warnings()
    try:
        train(argv)
    except (ConfigError, DataError) as err:  # every rank raises it alike: one line, from rank 0
        _exit(status.BAD_INPUT, f"error: {err}", every_rank=False)
    except Preempted as stop:
        _exit(status.PREEMPTED, f"preempted: {stop}", every_rank=False)
    except NonFiniteError as err:
        _exit(status.FAILED, f"error: {err}", every_rank=False)
    except Exception as err:  # noqa: BLE001 - anything else: its traceback, then its reason last
        traceback.print_exc()
        _exit(status.FAILED, f"error: rank {rank()}: {type(err).__name__}: {err}", every_rank=True)


def _exit(code: int, line: str, every_rank: bool) -> None:
    """Exit with `code`; the reason goes to the launcher (which prints it last, after accelerate's own report), or,
    when not launched by it, is printed here."""
    if not status.record(code, line) and (every_rank or is_main_process()):
        print(line, file=sys.stdout if code == status.PREEMPTED else sys.stderr, flush=True)
    sys.exit(code)
