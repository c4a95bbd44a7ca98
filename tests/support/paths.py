"""Every path a test names, declared once: the repository, the experiments and their files, the shared launchers,
the tiny assets and the real Qwen3 tokenizer fixture."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_DIR = REPO_ROOT / ".cache" / "tiny_smoke"  # the same place the 000 launcher builds them, so both reuse it
QWEN3_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "qwen3-4b-instruct-2507"
LAUNCH = REPO_ROOT / "scripts" / "launch_train.sh"
EVAL_LAUNCH = REPO_ROOT / "scripts" / "eval_all_checkpoints.sh"

EXPERIMENTS_DIR = REPO_ROOT / "experiments"
EXP_000 = EXPERIMENTS_DIR / "000_tiny_smoke"
EXP_009 = EXPERIMENTS_DIR / "009_text_summary"
EXP_010 = EXPERIMENTS_DIR / "010_text_summary_sp4"
EXP_011 = EXPERIMENTS_DIR / "011_million_tokens"
EXPERIMENTS = (EXP_000, EXP_009, EXP_010, EXP_011)

CONFIG_000, CONFIG_009, CONFIG_010, CONFIG_011 = (exp / "config.yaml" for exp in EXPERIMENTS)
TRAIN_000, TRAIN_009 = EXP_000 / "launch_train.sh", EXP_009 / "launch_train.sh"  # the launchers users run
EVAL_000 = EXP_000 / "eval_all_checkpoints.sh"
TRAIN_PY_000, TRAIN_PY_009 = EXP_000 / "train_cluster.py", EXP_009 / "train_cluster.py"
EVAL_PY_000 = EXP_000 / "eval_checkpoint.py"
