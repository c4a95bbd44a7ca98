"""The run directory (OUTPUT_DIR): resume or start afresh, and what every run records about itself.

    OUTPUT_DIR/run_config.yaml   every setting's final value (evaluation reads it back)
    OUTPUT_DIR/run_info.json     git commit, package versions, command line, world size, resumed_from
    OUTPUT_DIR/wandb_run.json    the W&B run's id and project, so evaluation can log into the same run
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

import yaml

from . import checkpoints
from .checkpoints import FINAL_ADAPTER
from .data import LENGTH_REPORT
from .distributed import is_main_process, print0
from .files import write_atomic
from .records import BAD_RECORDS_REPORT

RUN_CONFIG = "run_config.yaml"
RUN_INFO = "run_info.json"
WANDB_RUN = "wandb_run.json"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "wandb", "rouge-score",
            "flash-attn")


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


def git_commit() -> dict[str, str | bool | None]:
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
    write_atomic(out / RUN_CONFIG, yaml.safe_dump(config, sort_keys=True))
    info = {"packages": package_versions(), "python": platform.python_version(),
            "command": [sys.executable, *sys.argv], "config_file": config_path,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), **extra}
    write_atomic(out / RUN_INFO, json.dumps(info, indent=2))


def finish_wandb(output_dir: str) -> None:
    """Record the W&B run (OUTPUT_DIR/wandb_run.json, for evaluation) and close it."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        if is_main_process():
            write_atomic(Path(output_dir) / WANDB_RUN, json.dumps(
                {"id": wandb.run.id, "project": wandb.run.project, "name": wandb.run.name, "dir": wandb.run.dir}))
        wandb.finish()
