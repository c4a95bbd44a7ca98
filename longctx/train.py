"""Training, as a recipe: setup -> run directory -> data -> model -> trainer -> fit -> finish.

    bash experiments/009_text_summary/launch_train.sh          # the launcher: one process per GPU
    python experiments/000_tiny_smoke/train_cluster.py --config experiments/000_tiny_smoke/config.yaml

Experiments call `main()` from their train_cluster.py. However training ends, the process exits with one status of
longctx.exit_status, and its one-line reason is the last line it prints: 0 finished, 1 failed, 2 bad setting / data /
run directory, 75 stopped for a signal with a checkpoint. The settings change in one place only, `adapt_settings`,
before the run is recorded; what the Trainer is given beyond them is derived in `trainer_arguments`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import enable_full_determinism

from . import exit_status
from .config import parse_settings, resolved_config, validate
from .data.chat import check_template
from .data.collate import PadCollator
from .data.dataset import tokenize_split, write_length_report
from .data.length_cache import write_length_cache
from .data.records import RecordScan, check_records, usable_copy
from .data.tokenizer import load_tokenizer
from .errors import ConfigError, DataError, DiskFullError, NonFiniteError, Preempted
from .model import sequence_parallel
from .model.architecture import readable_architecture
from .model.loading import (
    apply_lora,
    apply_memory_switches,
    check_lora_targets,
    linear_layer_names,
    load_base_model,
    resolve_attn_implementation,
    resolve_dtype,
)
from .model.offload import has_accelerator
from .run import checkpoints, lock
from .run.directory import (
    GitState,
    check_output_dir,
    check_shared_output_dir,
    git_state,
    overwrite_refused,
    record_preemption,
    run_identity,
    start_afresh,
    write_run_info,
    write_shared_check,
)
from .run.layout import BAD_RECORDS_REPORT, FINAL_ADAPTER, FINAL_STATE, PREEMPTED, SHARED_CHECK, USABLE_DATA_DIR
from .run.tracking import finish_wandb_run, start_wandb_run, wants_wandb
from .settings import Settings
from .training.callbacks import END_OF_RUN, ManifestCallback, WatchdogCallback
from .training.preemption import PreemptionCallback
from .training.trainer import LongContextTrainer
from .training.watchdog import Watchdog
from .utils.distributed import (
    cpu_process_group_args,
    deepspeed_comm_on_cpu,
    is_distributed,
    is_main_process,
    on_rank_zero,
    print0,
    rank,
    teardown,
    use_timeout_for_new_groups,
)
from .utils.warning_filters import silence_unactionable_warnings

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class RunRecord:
    """What global rank 0 found and decided about OUTPUT_DIR; every rank receives it (prepare_run_dir)."""

    scans: dict[str, RecordScan]  # every record of each split, read once
    resume_from: str | None  # the checkpoint this launch continues from
    identity: dict  # the settings that change the result + the data's sha256 (longctx.run.directory.run_identity)
    lease: str  # the token of OUTPUT_DIR's lease this launch holds (longctx.run.lock)
    git: GitState
    data_files: dict[str, str]  # split -> the file to train on (a copy without the unusable records, when skipped)
    configured_files: dict[str, str]  # split -> the file as configured (the length cache is keyed by it)
    shared_check: str | None  # the token every rank must read back from OUTPUT_DIR (several processes)


# --- setup ------------------------------------------------------------------------------------------------------

def setup(argv: list[str]) -> tuple[Settings, dict[str, str], PreemptionCallback]:
    """Settings parsed and checked, the chat template split once (before any record is tokenized), the seed set, and
    from here on SIGTERM / SIGUSR1 mean: stop at the next optimizer step, with a checkpoint."""
    argv = argv + cpu_process_group_args(argv)  # CPU machines: several processes form one job (recorded setting)
    settings, _ = parse_settings(argv)
    experiment_dir = Path(settings.config_path).parent if settings.config_path else None
    validate(settings, world_size=int(os.environ.get("WORLD_SIZE", "1")),
             architecture=readable_architecture(settings.model.model_name_or_path, experiment_dir))
    check_lora_targets(settings.lora, settings.model, linear_layer_names(settings.model, experiment_dir))
    template = check_template(settings.model, settings.data)
    use_timeout_for_new_groups(settings.training.ddp_timeout)  # DeepSpeed's groups, made later: not NCCL's 10 min
    preemption = PreemptionCallback(settings.run.save_every_minutes)
    preemption.install()
    training = settings.training
    if training.full_determinism:
        enable_full_determinism(training.seed)
    else:
        set_seed(training.seed)
    return settings, template, preemption


# --- run directory ----------------------------------------------------------------------------------------------

def prepare_run_dir(settings: Settings, template: dict[str, str]) -> RunRecord:
    """One process for the whole job (global rank 0): read every record of the data files, decide what to do with
    OUTPUT_DIR (resume the same run, start afresh, or refuse), write the usable copies. Every rank receives the
    verdict, or the same ConfigError / DataError."""

    def on_rank_0() -> RunRecord:
        data, run, training = settings.data, settings.run, settings.training
        out = Path(training.output_dir)
        configured = {"train": data.train_file, "validation": data.validation_file}
        scans = {split: check_records(configured[split], data) for split in SPLITS}
        lease = lock.acquire(out, os.environ.get(lock.TOKEN_ENV))  # the launcher's lease, or a new one
        refused = overwrite_refused(out) if run.overwrite else None
        if refused:
            run.overwrite = False
            if not os.environ.get(lock.TOKEN_ENV):  # launched by the launcher, its preflight has said it
                print0(f"OVERWRITE=1 not applied: {refused}")
        identity = run_identity(resolved_config(*settings.groups()), training.world_size, template)
        resume_from = check_output_dir(run, str(out), identity, training.max_steps)
        if run.overwrite and out.is_dir():
            removed = start_afresh(out)
            if removed:
                print0(f"overwrite: removed {len(removed)} entries of the earlier run from {out}")
        out.mkdir(parents=True, exist_ok=True)
        if resume_from:
            print0(f"resuming from {resume_from} (step {checkpoints.global_step_of(Path(resume_from))}): the same "
                   f"data and settings as the run's first launch; OVERWRITE=1 starts afresh")
        return RunRecord(scans, resume_from, identity, lease.token, git_state(),
                         usable_files(scans, configured, out), configured,
                         write_shared_check(str(out)) if is_distributed() else None)

    run = on_rank_zero(on_rank_0)
    if run.shared_check:
        check_shared_output_dir(settings.training.output_dir, run.shared_check)  # every rank reads the token back
    return run


def usable_files(scans: dict[str, RecordScan], configured: dict[str, str], out: Path) -> dict[str, str]:
    """The file of each split to train on: the configured one, or under on_bad_record: skip a copy without the
    skipped records (OUTPUT_DIR/data_usable/), which are listed in OUTPUT_DIR/bad_records.jsonl. Rank 0 only."""
    problems = [p for scan in scans.values() for p in scan.problems]
    if not problems:
        return dict(configured)
    with (out / BAD_RECORDS_REPORT).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in problems)
    print0("bad records skipped (on_bad_record: skip): " + ", ".join(
        f"{split} {len(scan.problems)}" for split, scan in scans.items()) + f"; listed in {out / BAD_RECORDS_REPORT}")
    return {split: str(usable_copy(scan, out / USABLE_DATA_DIR)) if scan.problems else configured[split]
            for split, scan in scans.items()}


def adapt_settings(settings: Settings, run: RunRecord) -> None:
    """Every change this launch makes to the settings, here, before the run is recorded (run_config.yaml): the data
    files become the ones to train on (evaluation then reads the same), and an `overwrite` that has been carried out
    is recorded as done, so a relaunch from run_config.yaml never deletes this run."""
    settings.data.train_file, settings.data.validation_file = (run.data_files[split] for split in SPLITS)
    settings.run.overwrite = False


def record_run(settings: Settings, run: RunRecord, template: dict[str, str]) -> None:
    """Rank 0: OUTPUT_DIR/run_config.yaml (every setting's final value), run_info.json (commit, versions, identity),
    and the run's W&B run, started or continued before any weight loads."""
    if not is_main_process():
        return
    training, output_dir = settings.training, settings.training.output_dir
    config = resolved_config(*settings.groups())
    write_run_info(output_dir, config, settings.config_path,
                   {"git": asdict(run.git), "attn_implementation": resolve_attn_implementation(
                       settings.model.attn_implementation), "dtype": str(resolve_dtype(settings.model.torch_dtype)),
                    "resumed_from": run.resume_from, "identity": run.identity, **template})
    if wants_wandb(training):
        start_wandb_run(output_dir, training.run_name,
                        {**config, **template, "git_commit": run.git.commit, "git_dirty": run.git.dirty,
                         "files_sha256": run.identity["files_sha256"], "world_size": training.world_size})
    (Path(output_dir) / SHARED_CHECK).unlink(missing_ok=True)


# --- data -------------------------------------------------------------------------------------------------------

def prepare_data(settings: Settings, run: RunRecord):
    """(tokenizer, train dataset, eval dataset). Global rank 0 tokenizes first and writes the datasets cache; the
    other ranks, on every machine, read it. Rank 0 writes the length report and the length cache (the next launch's
    plan reads the corpus's real lengths from it)."""
    data, training = settings.data, settings.training
    tokenizer = load_tokenizer(settings.model)
    limits = {"train": data.max_train_samples, "validation": data.max_eval_samples}
    with training.main_process_first(local=False, desc="tokenize"):
        tokenized = {split: tokenize_split(getattr(data, f"{split}_file"), split, tokenizer, data, limits[split])
                     for split in SPLITS}
    if is_main_process():
        counts = {split: min(run.scans[split].count, limits[split] or run.scans[split].count) for split in SPLITS}
        print0(write_length_report([row for _, report in tokenized.values() for row in report],
                                   training.output_dir, counts))
        for split, (dataset, report) in tokenized.items():
            write_length_cache(training.output_dir, split, run.configured_files[split], settings.model, data,
                               dataset, report)
    return tokenizer, tokenized["train"][0], tokenized["validation"][0]


# --- model and trainer ------------------------------------------------------------------------------------------

def build_model(settings: Settings):
    """The base model with its LoRA adapter."""
    model = apply_lora(load_base_model(settings.model), settings.lora)
    if is_main_process():
        model.print_trainable_parameters()
    return model


def trainer_arguments(settings: Settings, model) -> TrainingArguments:
    """What the Trainer is given: a copy of the training settings with what this machine and launch derive from them
    (no pinned memory without an accelerator; sequence parallelism's ParallelismConfig; activation offload), and the
    memory switches applied to the model. The settings themselves stay as recorded."""
    args = copy.copy(settings.training)
    if not has_accelerator():
        args.dataloader_pin_memory = False  # nothing to pin for: torch would warn once per dataloader
    sp = settings.memory.sequence_parallel_size
    if sp > 1:
        attn = resolve_attn_implementation(settings.model.attn_implementation)
        args.parallelism_config = sequence_parallel.parallelism_config(sp, args.world_size, attn)
        deepspeed_comm_on_cpu()
    for line in apply_memory_switches(model, settings.memory, args):
        print0(line)
    return args


def build_trainer(settings: Settings, run: RunRecord, model, tokenizer, datasets,
                  preemption: PreemptionCallback, end_watchdog: Watchdog) -> LongContextTrainer:
    data, sp = settings.data, settings.memory.sequence_parallel_size
    collator = PadCollator(tokenizer.pad_token_id, **sequence_parallel.collator_padding(
        sp, data.max_seq_length, data.pad_to_multiple_of, torch.cuda.is_available()))
    return LongContextTrainer(
        model=model, args=trainer_arguments(settings, model), train_dataset=datasets[0], eval_dataset=datasets[1],
        data_collator=collator, processing_class=tokenizer,
        # in this order: the preemption request decides whether this step is the last, the watchdog reads it
        callbacks=[ManifestCallback(run.git.commit), preemption,
                   WatchdogCallback(settings.run.step_timeout_seconds, end_watchdog)],
    )


# --- fit and finish ---------------------------------------------------------------------------------------------

def fit(trainer: LongContextTrainer, run: RunRecord, preemption: PreemptionCallback,
        end_watchdog: Watchdog) -> Preempted | None:
    """Trainer.train from the checkpoint the run resumes from; returns the stop a signal asked for, if any."""
    if preemption.requested is not None:
        raise Preempted(f"stopped for {preemption.requested.name} before the first optimizer step; relaunch the "
                        f"same command to start it again")
    trainer.train(resume_from_checkpoint=run.resume_from)
    if end_watchdog.armed_for is None:  # no step ran (resumed at the end): guard the rest all the same
        end_watchdog.arm(END_OF_RUN)
    return preemption.outcome()


def save_final_adapter(trainer: Trainer, tokenizer, output_dir: str, commit: str | None) -> Path:
    """Rank 0 writes OUTPUT_DIR/final_adapter (peft save_pretrained, safetensors + tokenizer), reloads and checks
    every LoRA tensor, writes manifest.json (sizes, sha256, step, commit), and only then moves it into place;
    every rank then meets at a barrier."""
    final = Path(output_dir) / FINAL_ADAPTER
    if trainer.is_world_process_zero():
        tmp = final.with_name(f".{FINAL_ADAPTER}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = trainer.accelerator.unwrap_model(trainer.model)
        with checkpoints.writing(output_dir, tmp):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            checkpoints.verify_adapter(tmp, model)
            (tmp / FINAL_STATE).write_text(json.dumps({"global_step": trainer.state.global_step}))
            checkpoints.write_manifest(tmp, trainer.state.global_step, commit)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        print0(f"final adapter saved and verified: {final}")
    trainer.accelerator.wait_for_everyone()
    return final


def finish(trainer: LongContextTrainer, tokenizer, settings: Settings, run: RunRecord, stopped: Preempted | None,
           end_watchdog: Watchdog) -> None:
    """The verified final adapter (unless a signal stopped the run: then its checkpoint is the result, marked so its
    relaunch resumes it), W&B closed, every rank leaving together; all under the end-of-run watchdog, disarmed last."""
    out = Path(settings.training.output_dir)
    if stopped is None:
        save_final_adapter(trainer, tokenizer, str(out), run.git.commit)
        if is_main_process():
            (out / PREEMPTED).unlink(missing_ok=True)
    elif is_main_process():
        record_preemption(out, trainer.state.global_step, stopped.signal_name)
    finish_wandb_run(preempted=stopped is not None)
    teardown()
    end_watchdog.disarm()
    if stopped is not None:
        raise stopped
    print0("training finished")


# --- the recipe -------------------------------------------------------------------------------------------------

def train(argv: list[str] | None = None) -> None:
    settings, template, preemption = setup(list(sys.argv[1:] if argv is None else argv))
    run = prepare_run_dir(settings, template)
    heartbeat = lock.Heartbeat(settings.training.output_dir, run.lease).start() if is_main_process() else None
    try:
        recipe(settings, template, preemption, run)
    finally:  # however the run ends (a kill -9 aside: then the lease goes stale), OUTPUT_DIR is free again
        if heartbeat is not None:
            heartbeat.stop()


def recipe(settings: Settings, template: dict[str, str], preemption: PreemptionCallback, run: RunRecord) -> None:
    """Everything after the run directory is decided: record -> data -> model -> trainer -> fit -> finish."""
    adapt_settings(settings, run)
    print0(f"attention: {resolve_attn_implementation(settings.model.attn_implementation)}; weights: "
           f"{str(resolve_dtype(settings.model.torch_dtype)).replace('torch.', '')}; processes: "
           f"{settings.training.world_size}; max_seq_length: {settings.data.max_seq_length}"
           + (f"; sequence parallel: {sp} processes per sample" if (sp := settings.memory.sequence_parallel_size) > 1
              else ""))
    record_run(settings, run, template)
    tokenizer, *datasets = prepare_data(settings, run)
    model = build_model(settings)
    end_watchdog = Watchdog(settings.run.watchdog_timeout_seconds, "watchdog_timeout_seconds")
    trainer = build_trainer(settings, run, model, tokenizer, datasets, preemption, end_watchdog)
    stopped = fit(trainer, run, preemption, end_watchdog)
    finish(trainer, tokenizer, settings, run, stopped, end_watchdog)


def main(argv: list[str] | None = None) -> None:
    """train(), and every way it ends as an exit status with its reason as the last line (longctx.exit_status)."""
    silence_unactionable_warnings()
    exit_status.record_pid()
    try:
        train(argv)
    except (ConfigError, DataError) as err:  # every rank raises it alike: one line, from rank 0
        _exit(exit_status.BAD_INPUT, f"error: {err}", every_rank=False)
    except Preempted as stop:
        _exit(exit_status.PREEMPTED, f"preempted: {stop}", every_rank=False)
    except NonFiniteError as err:  # raised on every rank alike
        _exit(exit_status.FAILED, f"error: {err}", every_rank=False)
    except DiskFullError as err:  # on whichever rank's write failed
        _exit(exit_status.FAILED, f"error: {err}", every_rank=True)
    except Exception as err:  # noqa: BLE001 - anything else: its traceback, then its reason last
        traceback.print_exc()
        _exit(exit_status.FAILED, f"error: rank {rank()}: {type(err).__name__}: {err}", every_rank=True)


def _exit(code: int, line: str, every_rank: bool) -> None:
    """Exit with `code`; the reason goes to the launcher (which prints it last, after accelerate's own report), or,
    when not launched by it, is printed here."""
    if not exit_status.record(code, line) and (every_rank or is_main_process()):
        print(line, file=sys.stdout if code == exit_status.PREEMPTED else sys.stderr, flush=True)
    sys.exit(code)
