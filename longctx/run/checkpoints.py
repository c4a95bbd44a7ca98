"""Checkpoint discovery (complete ones only, in step order), adapter verification, trainer_state.json reading."""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError, ConfigError, DiskFullError
from ..utils.atomic_write import write_atomic
from ..utils.disk import directory_bytes, free_bytes, human_bytes, is_disk_full
from ..utils.hashing import sha256_file
from .layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_RE, FINAL_ADAPTER, FINAL_STATE, MANIFEST, TRAINER_STATE

HASHED = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    global_step: int

    @property
    def name(self) -> str:
        return self.path.name


def write_manifest(path: str | Path, global_step: int, git_commit: str | None) -> dict:
    """Record every file under `path` (size; sha256 for the adapter files), then write manifest.json last, via a
    rename, so its presence means the directory was written whole."""
    path = Path(path)
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry = {"size": file.stat().st_size}
        if file.name in HASHED:
            entry["sha256"] = sha256_file(file)
        files[file.relative_to(path).as_posix()] = entry
    manifest = {"global_step": global_step, "git_commit": git_commit, "files": files}
    write_atomic(path / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def manifest_problem(path: Path) -> str | None:
    """Why the files of `path` do not match its manifest.json (missing, truncated, altered), or None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{MANIFEST} is missing (the save did not finish)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, entry in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing (listed in {MANIFEST})"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, {MANIFEST} says {entry['size']} (truncated or altered)"
        if "sha256" in entry and sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST} (altered after saving)"
    return None


def adapter_problem(path: Path, require_manifest: bool = True) -> str | None:
    """Why this directory is not a complete, loadable adapter, or None when it is.

    Checkpoints written by this project carry manifest.json (written last); require_manifest=False accepts an
    adapter saved elsewhere (e.g. `eval_checkpoint.py --checkpoint` on a downloaded adapter) with the file checks only.
    """
    path = Path(path)
    if require_manifest or (path / MANIFEST).exists():
        problem = manifest_problem(path)
        if problem:
            return problem
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
    for name in (MANIFEST, FINAL_STATE):
        if (path / name).is_file():
            return int(json.loads((path / name).read_text())["global_step"])
    return None


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The checkpoint-N directories of a run in step order, not checked for completeness."""
    found = [p for p in Path(run_dir).iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def find_checkpoints(run_dir: str | Path, include_final: bool = True, warn=print, require_manifest: bool = True,
                     known_complete: Collection[str] = frozenset()) -> list[Checkpoint]:
    """checkpoint-N directories in step order, then final_adapter; incomplete ones are skipped with a warning.

    Names in `known_complete` (e.g. checkpoints already scored) are listed without being verified again:
    verification hashes the adapter files, and a rerun or a --follow poll should not pay for that each time."""
    run_dir = Path(run_dir)
    candidates = checkpoint_dirs(run_dir)
    final = run_dir / FINAL_ADAPTER
    if include_final and final.is_dir():
        candidates.append(final)
    found = []
    for path in candidates:
        problem = None if path.name in known_complete else adapter_problem(path, require_manifest)
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
    if not hasattr(model, "peft_config"):
        raise AdapterError("the model has no LoRA adapter to verify; wrap it with peft first.")
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    if not expected:
        raise AdapterError("the model has no LoRA parameters to save; check lora_target_modules.")
    problem = adapter_problem(path, require_manifest=False)
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


def complete_named(run_dir: str | Path, name: str, setting: str, value: str) -> Checkpoint:
    """The checkpoint `name` (checkpoint-N or final_adapter) of `run_dir`, complete per its manifest; else a
    ConfigError naming the setting (`setting` = `value`), what is wrong, and the run's complete checkpoints."""
    run_dir = Path(run_dir)
    path = run_dir / name
    complete = ", ".join(c.name for c in find_checkpoints(run_dir, warn=lambda _: None)) \
        if run_dir.is_dir() else ""
    if not (CHECKPOINT_RE.match(name) or name == FINAL_ADAPTER) or not path.is_dir():
        raise ConfigError(f"setting '{setting}' = {value}: no such checkpoint in {run_dir}; its complete checkpoints "
                          f"are: {complete or 'none'}.")
    problem = adapter_problem(path, require_manifest=True)
    if problem:
        raise ConfigError(f"setting '{setting}' = {value}: {path} is incomplete: {problem}; its complete checkpoints "
                          f"are: {complete or 'none'}.")
    return Checkpoint(path, global_step_of(path) or 0)


def latest_resumable(run_dir: str | Path, warn=print) -> Checkpoint | None:
    """The newest complete checkpoint-N that holds trainer state (what RESUME=auto continues from)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    usable = [c for c in find_checkpoints(run_dir, include_final=False, warn=warn)
              if (c.path / TRAINER_STATE).is_file()]
    return usable[-1] if usable else None


@contextmanager
def writing(run_dir: str | Path, target: str | Path) -> Iterator[None]:
    """Write `target` (a checkpoint or adapter directory in `run_dir`) inside this block: when the disk fills up,
    the incomplete target is removed (it has no manifest, so nothing would use it) and a DiskFullError names the
    directory, the free space, the last complete checkpoint and what to do, instead of the writer's traceback."""
    try:
        yield
    except Exception as err:
        if not is_disk_full(err, run_dir):
            raise
        target = Path(target)
        free, measured = free_bytes(run_dir)
        state = "nothing of it on disk"
        if target.is_dir() and not (target / MANIFEST).is_file():
            state = f"removed: incomplete, {human_bytes(directory_bytes(target))} written"
            shutil.rmtree(target, ignore_errors=True)
        last = latest_resumable(run_dir, warn=lambda _: None)
        resume = (f"the last complete checkpoint is {last.name} ({human_bytes(directory_bytes(last.path))}): free "
                  f"space and relaunch the same command to resume from it" if last is not None else
                  "no complete checkpoint yet: free space (or point OUTPUT_DIR elsewhere) and relaunch")
        raise DiskFullError(
            f"OUTPUT_DIR {run_dir} is full ({human_bytes(free)} free on {measured}) while writing {target.name} "
            f"({state}): {resume}; the run plan's disk line says what "
            f"the run needs") from err
