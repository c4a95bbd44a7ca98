"""The run directory (OUTPUT_DIR): one run per directory, resumed only when it is the same run, or started afresh;
what every run records about itself; and the check that every machine sees the same directory.

    OUTPUT_DIR/run_config.yaml   every setting's final value (evaluation reads it back)
    OUTPUT_DIR/run_info.json     git commit, package versions, command line, world size, resumed_from, and the run's
                                 identity (result-changing settings + data sha256) that a resume must match
    OUTPUT_DIR/wandb_run.json    the W&B run's id (longctx.run.tracking), so every launch and evaluation log into it
Every name inside OUTPUT_DIR is longctx.run.layout's.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..utils.atomic_write import write_atomic
from ..utils.distributed import gather_from_all, print0
from ..utils.hashing import sha256_file
from . import checkpoints
from .layout import CHECKPOINT_PREFIX, FINAL_ADAPTER, PREEMPTED, RUN_CONFIG, RUN_INFO, RUN_OUTPUTS, SHARED_CHECK

PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "wandb", "rouge-score",
            "flash-attn")


# Settings that may differ between the launches of one run: where and how often it logs, saves and evaluates, how
# it is launched and guarded. Every other setting changes the trained weights, so a resume compares them (and the
# data files' content) with what the run recorded at its first launch.
LAUNCH_SETTINGS = frozenset({
    "output_dir", "resume", "overwrite", "resume_from_checkpoint", "run_name", "project", "report_to",
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "disable_tqdm", "skip_memory_metrics", "debug",
    "save_steps", "save_strategy", "save_total_limit", "save_on_each_node", "save_only_model", "save_every_minutes",
    "eval_steps", "eval_strategy", "eval_delay", "eval_on_start", "eval_accumulation_steps", "eval_do_concat_batches",
    "eval_use_gather_object", "per_device_eval_batch_size", "prediction_loss_only", "batch_eval_metrics",
    "bf16_full_eval", "fp16_full_eval", "max_eval_samples", "max_new_tokens", "generation_batch_size",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "include_for_metrics",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "preprocessing_num_workers", "datasets_cache_dir", "torch_empty_cache_steps",
    "ddp_timeout", "accelerator_config", "deepspeed", "local_rank", "do_train", "do_eval", "do_predict",
    "watchdog_timeout_seconds", "step_timeout_seconds", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_private_repo", "hub_always_push", "hub_revision", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id",
    "train_file", "validation_file", "chat_template",  # compared by content (sha256), not by path
})
DATA_FILES = ("train_file", "validation_file")
def run_identity(config: dict[str, Any], world_size: int, template: dict[str, str]) -> dict[str, Any]:
    """What makes two launches the same run: every setting that changes the trained weights, the content of the
    data files, the chat template in use (`longctx.data.chat.template_record`: the tokenizer's own one can change with a
    hub snapshot) and the number of processes (it sets the samples per optimizer step)."""
    settings = {k: v for k, v in config.items() if k not in LAUNCH_SETTINGS}
    files = {name: sha256_file(config[name]) for name in DATA_FILES if config.get(name)}
    files["chat_template"] = template["chat_template_sha256"]
    return {"settings": settings, "files_sha256": files, "world_size": world_size}


def identity_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences, e.g. "max_steps: -1 -> 10", "train_file content (sha256 1a2b3c4d -> 9f8e7d6c)"."""
    out = []
    old_settings, new_settings = recorded.get("settings", {}), current["settings"]
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            out.append(f"{key}: {old_settings.get(key)!r} -> {new_settings.get(key)!r}")
    old_files, new_files = recorded.get("files_sha256", {}), current["files_sha256"]
    for key in sorted(set(old_files) | set(new_files)):
        if old_files.get(key) != new_files.get(key):
            out.append(f"{key} content (sha256 {str(old_files.get(key))[:8]} -> {str(new_files.get(key))[:8]})")
    if recorded.get("world_size") != current["world_size"]:
        out.append(f"processes: {recorded.get('world_size')} -> {current['world_size']} (samples per optimizer step)")
    return out


def start_afresh(out: Path) -> list[str]:
    """Remove everything an earlier run wrote into OUTPUT_DIR (checkpoints, final adapter, reports, W&B files,
    evaluation outputs, the best link); returns the names removed. Files the project does not write stay."""
    removed = []
    for path in sorted(out.glob(f"{CHECKPOINT_PREFIX}*")) + [out / name for name in RUN_OUTPUTS]:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path.name)
    return removed


def overwrite_refused(out: Path, env=os.environ) -> str | None:
    """Why OVERWRITE must not delete the run in OUTPUT_DIR now (a relaunch of the same job, which resumes it), or
    None. OVERWRITE deletes a run once: not again when SLURM requeues the job (the requeued script carries the
    original sbatch's environment, OVERWRITE=1 included), nor when the same command is relaunched after the run
    stopped for a signal at a checkpoint (OUTPUT_DIR/preempted.json, written with that checkpoint)."""
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    if restarts not in ("", "0"):
        return f"this is restart {restarts} of SLURM job {env.get('SLURM_JOB_ID', '?')}: the run it started resumes"
    stopped = _read_json(out / PREEMPTED)
    if stopped:
        return (f"the run stopped for {stopped.get('signal', 'a signal')} at step {stopped.get('step', '?')} with a "
                f"checkpoint ({PREEMPTED}), and this relaunch resumes it")
    return None


def record_preemption(out: Path, step: int, signal_name: str) -> None:
    """Mark the run as stopped for a signal at a checkpoint of `step` (rank 0): its relaunch resumes it, whatever
    OVERWRITE says. Removed when the run finishes or starts afresh."""
    write_atomic(out / PREEMPTED, json.dumps({"step": step, "signal": signal_name, "time": time.time()}))


def check_output_dir(run, output_dir: str, identity: dict[str, Any], max_steps: int) -> str | None:
    """Decide what this launch does with OUTPUT_DIR; returns the checkpoint to resume from, if any.

    OVERWRITE (run.overwrite) starts afresh whatever RESUME says. Otherwise a directory holding a run is resumed
    (RESUME=auto) only when it is the same run (run_identity equal to the recorded one) and not finished; anything
    else is a ConfigError naming what differs and the ways on. Nothing is written here."""
    out = Path(output_dir)
    ways_on = (f"choose another OUTPUT_DIR, start afresh with OVERWRITE=1 (deletes that run), or relaunch with "
               f"that run's settings and data ({out / RUN_CONFIG})")
    if run.overwrite or not out.is_dir():
        return None
    existing = sorted(out.glob(f"{CHECKPOINT_PREFIX}*")) + ([out / FINAL_ADAPTER] if (out / FINAL_ADAPTER).exists() else [])
    if not existing:
        return None
    if run.resume == "never":
        raise ConfigError(f"setting 'resume' = 'never' but OUTPUT_DIR {out} already holds {existing[0].name}; "
                          f"set RESUME=auto to continue that run, OVERWRITE=1 to delete it and start afresh, or "
                          f"choose another OUTPUT_DIR.")
    recorded = _read_json(out / RUN_INFO).get("identity")
    if recorded is not None:
        differences = identity_differences(recorded, identity)
        if differences:
            raise ConfigError(f"OUTPUT_DIR {out} holds another run: " + "; ".join(differences) + f". To go on, "
                              f"{ways_on}.")
    final = out / FINAL_ADAPTER
    if final.is_dir():
        step = checkpoints.global_step_of(final)
        raise ConfigError(f"OUTPUT_DIR {out} holds a finished run (final_adapter at step {step}): nothing to "
                          f"train. To train again, choose another OUTPUT_DIR or start afresh with OVERWRITE=1 "
                          f"(deletes that run); to score it, run eval_all_checkpoints.sh.")
    latest = checkpoints.latest_resumable(out, warn=print0)
    if latest and 0 < max_steps <= latest.global_step:
        raise ConfigError(f"setting 'max_steps' = {max_steps}: OUTPUT_DIR {out} is already at step "
                          f"{latest.global_step} ({latest.name}); nothing to train. Raise max_steps, or {ways_on}.")
    return str(latest.path) if latest else None


def write_shared_check(output_dir: str) -> str:
    """Rank 0: write a fresh token into OUTPUT_DIR for check_shared_output_dir; returns it."""
    token = uuid.uuid4().hex
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(output_dir) / SHARED_CHECK, token)
    return token


def check_shared_output_dir(output_dir: str, token: str) -> None:
    """Every rank reads back the token rank 0 wrote: with several machines, OUTPUT_DIR must be one directory on a
    filesystem they all mount (checkpoints are written by several ranks and resume reads them back)."""
    path = Path(output_dir) / SHARED_CHECK
    try:
        seen = path.read_text(encoding="utf-8") == token
    except OSError:
        seen = False
    blind = [f"rank {r} ({host})" for r, (host, ok) in enumerate(gather_from_all((socket.gethostname(), seen)))
             if not ok]
    if blind:
        raise ConfigError(f"OUTPUT_DIR {output_dir} is not one shared directory: {', '.join(blind)} cannot see the "
                          f"file rank 0 wrote there. Put OUTPUT_DIR on a filesystem every machine mounts at the same "
                          f"path (checkpoints and resume need it).")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class GitState:
    """The code a run was trained with: the commit of this repository and whether the working tree had changes
    (None for both outside a git checkout)."""

    commit: str | None
    dirty: bool | None


def git_state() -> GitState:
    root = Path(__file__).resolve().parents[2]  # the repository: longctx/run/ -> longctx/ -> root
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                                    text=True).stdout.strip())
        return GitState(commit, dirty)
    except (OSError, subprocess.CalledProcessError):
        return GitState(None, None)


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (indices or UUIDs); all of the machine's when unset."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu for gpu in listed.split(",") if gpu]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def write_run_info(output_dir: str, config: dict, config_path: str | None, extra: dict) -> None:
    """OUTPUT_DIR/run_config.yaml (every setting's final value) and run_info.json (commit, versions, command)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RUN_CONFIG, yaml.safe_dump(config, sort_keys=True))
    info = {"packages": package_versions(), "python": platform.python_version(),
            "command": [sys.executable, *sys.argv], "config_file": config_path,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "machine": {"host": socket.gethostname(), "gpus": visible_gpus()},  # evaluation --follow compares
            **extra}
    write_atomic(out / RUN_INFO, json.dumps(info, indent=2))
