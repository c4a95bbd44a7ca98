"""Fixtures only (helpers are in tests/support/): the offline environment, the tiny assets built once per session,
and the real training runs that many tests read (each trained once per session, through the real launcher).

The suite runs on two pytest-xdist workers (pyproject.toml). The tests that read one trained run share a worker
(xdist_group: the run is trained once), each worker's processes get an equal share of the cores, and every
multi-process test launches on a port of its own."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from support.env import OFFLINE
from support.evaluation import NAMES, QUICK_TRAINING, SCORE_FLAGS, copy_run
from support.launching import REFERENCE, run
from support.paths import EVAL_000, TINY_DIR, TRAIN_000

for _name, _value in OFFLINE.items():
    os.environ.setdefault(_name, _value)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # before torch is imported: its threads share the cores
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # A test run started in the background (`&` in a script, nohup) inherits SIGINT ignored, and an ignored signal
    # stays ignored across exec: the launchers could not trap Ctrl-C. The processes the tests start get it as a
    # terminal's foreground job has it (a caught signal is reset to its default by exec).
    signal.signal(signal.SIGINT, signal.default_int_handler)
SHARED_RUNS = ("trained_run", "scored_run", "reference_run")  # session fixtures that train through a launcher


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(items):
    """Tests that read the same trained run go to one worker (pytest-xdist --dist loadgroup), so it is trained once."""
    for item in items:
        shared = [name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group("reference" if shared == ["reference_run"] else "trained"))


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
    """000 trained once with support.launching.REFERENCE (one process, W&B offline): (its OUTPUT_DIR, the
    launcher's output). Tests read it, never write into it (copy it first)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run(["bash", TRAIN_000, *REFERENCE], OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


# ==== evaluation (tests/eval/): one real training run per session ===================================================
# Training is the expensive part, so it runs once for every evaluation test; each test works on its own copy
# (support.evaluation.copy_run).

@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_dir) -> Path:
    """A real training run (W&B offline, so it leaves wandb_run.json) with checkpoint-2, -4, -5 + final_adapter."""
    out = tmp_path_factory.mktemp("trained")
    proc = run(["bash", TRAIN_000, *QUICK_TRAINING], timeout=600, OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if (p / "adapter_config.json").is_file()) == NAMES
    assert (out / "wandb_run.json").is_file()
    return out


@pytest.fixture(scope="session")
def scored_run(trained_run, tmp_path_factory):
    """(a copy of the run scored once by eval_all_checkpoints.sh with SCORE_FLAGS in one process, its output)."""
    out = copy_run(trained_run, tmp_path_factory.mktemp("scored") / "run")
    proc = run(["bash", EVAL_000, *SCORE_FLAGS], OUTPUT_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc
