"""Shared fixtures: offline environment, the tiny assets (built once per session), small data files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_DIR = REPO_ROOT / ".cache" / "tiny_smoke"  # the same place the 000 launcher builds them, so both reuse it

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """.cache/tiny_smoke with model/ (tokenizer + tiny Qwen3) and data/{train,validation}.jsonl."""
    from longctx import tiny

    return tiny.build(TINY_DIR)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir / "model")


@pytest.fixture()
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype="float32")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_dir) -> tuple[Path, object]:
    """000 trained once with launching.REFERENCE (one process, W&B offline): (its OUTPUT_DIR, the launcher's
    output). Tests read it, never write into it (copy it first)."""
    from launching import REFERENCE, TRAIN_000, run

    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run(["bash", TRAIN_000, *REFERENCE], OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def write_jsonl(path: Path, records: list) -> Path:
    """Write records (dicts, or raw str lines written as they are) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for launcher subprocesses: offline, repo importable, one thread per process."""
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "WANDB_MODE": "offline", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    env.update(extra)
    return env


# ==== evaluation (tests/test_eval_*.py): one real training run per session ==========================================
# Training is the expensive part, so it runs once for every evaluation test; each test works on its own copy
# (eval_support.copy_run). Helpers live in tests/eval_support.py.

@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dir) -> Path:
    """A real training run (W&B offline, so it leaves wandb_run.json) with checkpoint-2, -4, -5 + final_adapter."""
    from eval_support import NAMES, QUICK_TRAINING
    from launching import TRAIN_000 as TRAIN, run

    out = tmp_path_factory.mktemp("trained")
    proc = run(["bash", TRAIN, *QUICK_TRAINING], timeout=600, OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if (p / "adapter_config.json").is_file()) == NAMES
    assert (out / "wandb_run.json").is_file()
    return out


@pytest.fixture(scope="session")
def scored_run(trained_run, tmp_path_factory):
    """(a copy of the run scored once by eval_all_checkpoints.sh with SCORE_FLAGS in one process, its output)."""
    from eval_support import SCORE_FLAGS, copy_run
    from launching import EVAL_000 as EVAL, run

    out = copy_run(trained_run, tmp_path_factory.mktemp("scored") / "run")
    proc = run(["bash", EVAL, *SCORE_FLAGS], OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc
# ==== end of evaluation fixtures =====================================================================================
