"""Checkpoint discovery (complete ones only, in step order), adapter verification, trainer_state.json reading."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class AdapterError(ValueError):
    """An adapter directory is missing files or holds empty / misshapen tensors."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    global_step: int

    @property
    def name(self) -> str:
        return self.path.name


def adapter_problem(path: Path) -> str | None:
    """Why this directory is not a loadable adapter, or None when it is."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{ADAPTER_CONFIG} is unreadable ({err})"
    try:
        from safetensors import safe_open

        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
            if not list(f.keys()):
                return f"{ADAPTER_WEIGHTS} holds no tensors"
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
        return f"{ADAPTER_WEIGHTS} is unreadable ({type(err).__name__}: {err})"
    return None


def global_step_of(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(path.name)
    if match:
        return int(match.group(1))
    state = path / "final_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    return None


def find_checkpoints(run_dir: str | Path, include_final: bool = True, warn=print) -> list[Checkpoint]:
    """checkpoint-N directories in step order, then final_adapter; incomplete ones are skipped with a warning."""
    run_dir = Path(run_dir)
    candidates = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    candidates.sort(key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))
    final = run_dir / "final_adapter"
    if include_final and final.is_dir():
        candidates.append(final)
    found = []
    for path in candidates:
        problem = adapter_problem(path)
        if problem:
            warn(f"skipping {path}: {problem}")
            continue
        found.append(Checkpoint(path, global_step_of(path) or 0))
    return found


def read_trainer_state(path: str | Path) -> dict:
    state = Path(path) / TRAINER_STATE
    return json.loads(state.read_text(encoding="utf-8")) if state.is_file() else {}


def verify_adapter(path: str | Path, model) -> int:
    """Check that the saved adapter holds every LoRA tensor of `model`, non-empty and of the same shape.

    Guards against the classic empty-adapter save (e.g. parameters still partitioned by ZeRO-3 when saved).
    Returns the number of tensors checked.
    """
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    path = Path(path)
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    if not expected:
        raise AdapterError("the model has no LoRA parameters to save; check lora_target_modules.")
    problem = adapter_problem(path)
    if problem:
        raise AdapterError(f"{path}: {problem}")
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise AdapterError(f"{path}: {len(missing)} LoRA tensors missing from {ADAPTER_WEIGHTS}, e.g. {missing[0]}")
    for key, shape in expected.items():
        if saved[key] != shape or 0 in saved[key]:
            raise AdapterError(f"{path}: tensor {key} has shape {saved[key]}, expected {shape}")
    return len(expected)
