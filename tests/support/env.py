"""The environment tests run in (offline, one thread per process) and small data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .paths import REPO_ROOT

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for launcher subprocesses: offline, repo importable, one thread per process."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "WANDB_MODE": "offline", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    env.update(extra)
    return env


def write_jsonl(path: Path, records: list) -> Path:
    """Write records (dicts, or raw str lines written as they are) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path
