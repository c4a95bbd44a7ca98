"""longctx.run.checkpoints: complete checkpoints in step order, incomplete ones skipped with a reason, adapter checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from longctx.errors import AdapterError, DiskFullError
from longctx.model.loading import apply_lora
from longctx.run.checkpoints import (
    find_checkpoints,
    read_trainer_state,
    verify_adapter,
    write_manifest,
    writing,
)
from longctx.run.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST
from longctx.settings import LoraArguments
from support.disk import fill, small_disk


@pytest.fixture()
def lora_model(tiny_model):
    return apply_lora(tiny_model, LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                                lora_target_modules=["q_proj", "v_proj"]))


@pytest.fixture()
def saved_adapter(lora_model, tmp_path):
    path = tmp_path / "saved_adapter"
    lora_model.save_pretrained(path, safe_serialization=True)
    assert (path / ADAPTER_WEIGHTS).is_file() and (path / ADAPTER_CONFIG).is_file()
    return path


def saved_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --- find_checkpoints -----------------------------------------------------------------------------------------------


def complete_copy(saved_adapter, path, step: int):
    """A checkpoint as training writes it: the adapter files, then manifest.json last."""
    shutil.copytree(saved_adapter, path)
    write_manifest(path, step, git_commit=None)
    return path


@pytest.fixture()
def run_dir(tmp_path, saved_adapter):
    run = tmp_path / "run"
    run.mkdir()
    for step in (9, 10, 2, 100):
        complete_copy(saved_adapter, run / f"checkpoint-{step}", step)
    shutil.copytree(saved_adapter, run / "final_adapter")
    (run / "final_adapter" / "final_state.json").write_text(json.dumps({"global_step": 120}))
    write_manifest(run / "final_adapter", 120, git_commit=None)
    # incomplete: weights gone
    complete_copy(saved_adapter, run / "checkpoint-5", 5)
    (run / "checkpoint-5" / ADAPTER_WEIGHTS).unlink()
    # incomplete: weights cut off
    weights = complete_copy(saved_adapter, run / "checkpoint-7", 7) / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # incomplete: the save never reached its manifest
    shutil.copytree(saved_adapter, run / "checkpoint-8")
    # not checkpoints at all
    complete_copy(saved_adapter, run / "checkpoint-latest", 0)
    (run / "logs").mkdir()
    (run / "checkpoint-3").write_text("a file, not a directory")
    return run


def test_find_checkpoints_numeric_order_then_final(run_dir):
    found = find_checkpoints(run_dir, warn=lambda message: None)
    assert [c.name for c in found] == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100",
                                       "final_adapter"]
    assert [c.global_step for c in found] == [2, 9, 10, 100, 120]
    assert all(c.path.parent == run_dir for c in found)


def test_find_checkpoints_warns_about_incomplete_ones(run_dir):
    warnings = []
    find_checkpoints(run_dir, warn=warnings.append)
    assert len(warnings) == 3, warnings

    def about(name):
        hits = [w for w in warnings if f"{run_dir / name}:" in w]
        assert len(hits) == 1, (name, warnings)
        return hits[0]

    assert f"{ADAPTER_WEIGHTS} is missing" in about("checkpoint-5")
    size = (run_dir / "checkpoint-7" / ADAPTER_WEIGHTS).stat().st_size
    assert f"{ADAPTER_WEIGHTS} has {size} bytes" in about("checkpoint-7")
    assert "truncated" in about("checkpoint-7")
    assert f"{MANIFEST} is missing" in about("checkpoint-8")


def test_find_checkpoints_lists_known_complete_names_without_verifying_them(run_dir):
    warnings = []
    found = find_checkpoints(run_dir, warn=warnings.append, known_complete={"checkpoint-5", "checkpoint-8"})
    # checkpoint-5 (weights gone) and checkpoint-8 (no manifest) are listed as told; checkpoint-7 is still verified.
    assert [c.name for c in found] == ["checkpoint-2", "checkpoint-5", "checkpoint-8", "checkpoint-9", "checkpoint-10",
                                       "checkpoint-100", "final_adapter"]
    assert [c.global_step for c in found][1:3] == [5, 8]
    assert len(warnings) == 1 and f"{run_dir / 'checkpoint-7'}:" in warnings[0]


def test_find_checkpoints_without_final(run_dir):
    found = find_checkpoints(run_dir, include_final=False, warn=lambda message: None)
    assert [c.name for c in found] == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100"]


def test_find_checkpoints_file_checks_without_manifest(tmp_path, saved_adapter):
    """Adapters saved elsewhere (no manifest.json): missing, truncated, config-less and empty files still caught."""
    run = tmp_path / "run"
    shutil.copytree(saved_adapter, run / "checkpoint-1")
    (run / "checkpoint-1" / ADAPTER_CONFIG).unlink()
    shutil.copytree(saved_adapter, run / "checkpoint-2")
    save_file({}, str(run / "checkpoint-2" / ADAPTER_WEIGHTS))
    shutil.copytree(saved_adapter, run / "checkpoint-3")
    shutil.copytree(saved_adapter, run / "checkpoint-4")
    weights = run / "checkpoint-4" / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(saved_adapter, run / "checkpoint-5")
    (run / "checkpoint-5" / ADAPTER_WEIGHTS).unlink()
    warnings = []
    found = find_checkpoints(run, warn=warnings.append, require_manifest=False)
    assert [c.name for c in found] == ["checkpoint-3"]
    assert len(warnings) == 4
    assert any(f"{run / 'checkpoint-1'}:" in w and f"{ADAPTER_CONFIG} is missing" in w for w in warnings)
    assert any(f"{run / 'checkpoint-2'}:" in w and "holds no tensors" in w for w in warnings)
    assert any(f"{run / 'checkpoint-4'}:" in w and f"{ADAPTER_WEIGHTS} is unreadable" in w for w in warnings)
    assert any(f"{run / 'checkpoint-5'}:" in w and f"{ADAPTER_WEIGHTS} is missing" in w for w in warnings)


def test_manifest_catches_altered_weights(tmp_path, saved_adapter):
    path = complete_copy(saved_adapter, tmp_path / "run" / "checkpoint-1", 1)
    weights = path / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    warnings = []
    assert find_checkpoints(tmp_path / "run", warn=warnings.append) == []
    assert "sha256" in warnings[0] and str(path) in warnings[0]


def test_read_trainer_state(tmp_path):
    assert read_trainer_state(tmp_path) == {}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 50, "log_history": []}))
    assert read_trainer_state(tmp_path)["global_step"] == 50


# --- verify_adapter ------------------------------------------------------------------------------------------------


def test_verify_adapter_passes_on_real_save(lora_model, saved_adapter):
    tensors = saved_tensors(saved_adapter)
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert len(tensors) == 8
    assert verify_adapter(saved_adapter, lora_model) == 8


def test_verify_adapter_missing_tensor(lora_model, saved_adapter):
    tensors = saved_tensors(saved_adapter)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(saved_adapter / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterError) as info:
        verify_adapter(saved_adapter, lora_model)
    message = str(info.value)
    assert str(saved_adapter) in message
    assert "1 LoRA tensors missing" in message and dropped in message


def test_verify_adapter_zero_size_tensor(lora_model, saved_adapter):
    tensors = saved_tensors(saved_adapter)
    emptied = next(k for k in sorted(tensors) if "lora_A" in k)
    shape = tuple(tensors[emptied].shape)
    tensors[emptied] = torch.empty(0, shape[1])
    save_file(tensors, str(saved_adapter / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterError) as info:
        verify_adapter(saved_adapter, lora_model)
    message = str(info.value)
    assert emptied in message
    assert f"(0, {shape[1]})" in message and f"expected {shape}" in message


def test_verify_adapter_missing_weights_file(lora_model, saved_adapter):
    (saved_adapter / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=f"{ADAPTER_WEIGHTS} is missing"):
        verify_adapter(saved_adapter, lora_model)



# --- a full disk while writing ---------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_a_checkpoint_removes_it_and_names_the_last_complete_one(tmp_path, saved_adapter):
    with small_disk(tmp_path / "disk", 8) as run:
        last = complete_copy(saved_adapter, run / "checkpoint-1", 1)
        (last / "trainer_state.json").write_text("{}")
        write_manifest(last, 1, git_commit=None)
        # its size, summed here: the adapter files, trainer_state.json and manifest.json
        last_bytes = sum(f.stat().st_size for f in last.iterdir())
        fill(run / "filler")
        with pytest.raises(DiskFullError) as err:
            with writing(run, run / "checkpoint-2"):
                (run / "checkpoint-2").mkdir()  # a directory takes no block on tmpfs; its first file fails
                torch.save({"exp_avg": torch.zeros(1000)}, run / "checkpoint-2" / "optimizer.pt")
        assert not (run / "checkpoint-2").exists() and (last / MANIFEST).is_file()
    assert isinstance(err.value.__cause__, RuntimeError)  # torch's own "unexpected pos", kept as the cause
    assert str(err.value) == (
        f"OUTPUT_DIR {run} is full (0.0 MiB free on {run}) while writing checkpoint-2 (removed: incomplete, 0.0 MiB "
        f"written): the last complete checkpoint is checkpoint-1 ({last_bytes / 2**20:.1f} MiB): free space and "
        f"relaunch the same command to resume from it; the run plan's disk line says what the run needs")


def test_other_write_failures_pass_through_writing_unchanged(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(PermissionError):
        with writing(tmp_path, tmp_path / "checkpoint-3"):
            raise PermissionError(13, "Permission denied")
    assert (tmp_path / "checkpoint-3").is_dir()  # not a full disk: nothing removed
