"""longctx.training.callbacks: checkpoint-N/manifest.json once a save is complete; the step watchdog armed at each
step's start and handed over to the end-of-run watchdog at the last step."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from longctx.run.checkpoints import manifest_problem
from longctx.run.layout import MANIFEST
from longctx.training.callbacks import END_OF_RUN, ManifestCallback, WatchdogCallback
from longctx.training.watchdog import Watchdog


def test_a_saved_checkpoint_gets_its_manifest_and_a_missing_one_none(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    (ckpt / "adapter_config.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text("{}")
    args, state = SimpleNamespace(output_dir=str(tmp_path)), TrainerState(global_step=4)
    ManifestCallback("abc123").on_save(args, state, TrainerControl())
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert (manifest["global_step"], manifest["git_commit"]) == (4, "abc123")
    assert manifest["files"]["adapter_model.safetensors"]["size"] == 10
    assert manifest_problem(ckpt) is None
    assert f"checkpoint complete: {ckpt} (step 4)" in capsys.readouterr().out
    ManifestCallback(None).on_save(args, TrainerState(global_step=6), TrainerControl())  # checkpoint-6 not written
    assert not (tmp_path / "checkpoint-6").exists()


def test_the_step_guard_covers_each_step_and_hands_over_at_the_last(tmp_path, monkeypatch):
    # faulthandler writes to a real file descriptor: stderr is a file here, not pytest's capture
    monkeypatch.setattr(sys, "stderr", (tmp_path / "stderr").open("w+"))
    end = Watchdog(900, "watchdog_timeout_seconds")
    callback = WatchdogCallback(600, end)
    args, control = SimpleNamespace(), TrainerControl()
    callback.on_step_begin(args, TrainerState(global_step=0, max_steps=2), control)
    assert (callback.step.armed_for, end.armed_for) == ("each optimizer step, with its eval and save,", None)
    callback.on_step_end(args, TrainerState(global_step=1, max_steps=2), control)
    assert end.armed_for is None  # step 1 of 2: the step guard stays until the next step begins
    callback.on_step_end(args, TrainerState(global_step=2, max_steps=2), control)
    assert (callback.step.armed_for, end.armed_for) == (None, END_OF_RUN)
    # a stop decided earlier (a preemption) is the last step too
    end.disarm()
    control.should_training_stop = True
    callback.on_step_begin(args, TrainerState(global_step=5, max_steps=100), control)
    callback.on_step_end(args, TrainerState(global_step=6, max_steps=100), control)
    assert end.armed_for == END_OF_RUN
    sys.stderr.flush()
    assert (tmp_path / "stderr").read_text().count(
        "watchdog: each optimizer step, with its eval and save, must finish within 600 s") == 1


@pytest.fixture(autouse=True)
def no_timer_left_behind():
    yield
    import faulthandler

    faulthandler.cancel_dump_traceback_later()
