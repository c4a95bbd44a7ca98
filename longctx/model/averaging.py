"""Checkpoint averaging for LoRA, exact: the average of K adapters' updates is itself a LoRA adapter.

    python -m longctx.export --run_dir runs/009_text_summary --average_last 3 --output exports/009-avg3
    bash experiments/009_text_summary/eval_all_checkpoints.sh --average_last 3      # one more results row

A plain LoRA adapter changes each targeted linear layer's weight by dW = s * B @ A (A: r x in, B: out x r; scaling
s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora). Averaging the A's and the B's separately is not
averaging the models: (sum B_i / K) @ (sum A_i / K) holds the cross terms B_i @ A_j of different checkpoints, which
no checkpoint ever trained, and it depends on each checkpoint's arbitrary factorisation (B @ A = (B M) @ (M^-1 A) for
any invertible M). The average of the updates is exact instead, and is itself a LoRA adapter:

    (1/K) sum_i s_i B_i @ A_i  =  [s_1 B_1 / K | ... | s_K B_K / K]  @  [A_1; ...; A_K]

of rank R = sum r_i: A = the A_i stacked as rows (R x in), B = the scaled B_i side by side (out x R), lora_alpha = R
(scaling 1, use_rslora off). peft loads it like any adapter, the evaluation swaps it in like a checkpoint, and
export merges it. It is written in float32 (the scaled B's, exact where s_i / K is a power of two, else one rounding).

What it costs: rank K x r, so K times the adapter's size and its share of the compute. What an adapter of the
original rank r would lose instead is reported (`TruncationError`): per module, the relative Frobenius error of the
best rank-r approximation of the averaged update (Eckart-Young: its truncated SVD), the largest over modules. The
out x in update is never formed: with thin QR factorisations B = Q_B R_B and A^T = Q_A R_A, B @ A = Q_B (R_B R_A^T)
Q_A^T has the singular values of the R x R matrix R_B R_A^T (in float64).

Only plain LoRA can be averaged this way: DoRA (a learned magnitude rescales the whole weight), trained biases,
modules_to_save, per-module rank or alpha patterns, initialisations that change the base weights (PiSSA, OLoRA,
LoftQ, CorDA, LoRA-GA) and the other variants are refused, as are members of different base models or targets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..run import checkpoints
from ..run.checkpoints import Checkpoint
from ..run.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AVERAGE_INFO,
    AVERAGE_PREFIX,
    CHECKPOINT_RE,
    FINAL_ADAPTER,
    MANIFEST,
)
from ..utils.hashing import sha256_file

# adapter_config.json keys that, when set, make the update something other than s * B @ A (or tie it to changed
# base weights): an adapter with any of them is not averaged.
NOT_PLAIN_LORA = {
    "use_dora": "DoRA: a learned magnitude rescales the whole weight, the update is not s * B @ A",
    "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA", "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (not on linear layers)",
    "modules_to_save": "fully trained copies of modules besides the LoRA update",
    "trainable_token_indices": "trainable tokens", "lora_bias": "a trained LoRA bias",
    "rank_pattern": "a per-module rank_pattern", "alpha_pattern": "a per-module alpha_pattern",
    "megatron_config": "Megatron parallel layers",
    "loftq_config": "LoftQ (quantised, changed base weights)", "corda_config": "CorDA (changed base weights)",
    "lora_ga_config": "LoRA-GA (changed base weights)",
}
PLAIN_INITS = (True, False, "gaussian", "eva")  # initialisations that leave the base weights as they are
SAME_IN_EVERY_MEMBER = ("peft_type", "task_type", "base_model_name_or_path", "target_modules", "exclude_modules",
                        "fan_in_fan_out", "layers_to_transform", "layers_pattern")
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
MAX_NAME_LENGTH = 120  # longer names (many members) end in a hash of the members instead of every step


@dataclass(frozen=True)
class Member:
    """One adapter of an average: a complete checkpoint (or final_adapter) of the run."""

    name: str
    path: Path
    global_step: int
    config: dict  # adapter_config.json
    adapter_sha256: str  # of adapter_model.safetensors, as its manifest records it

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        """peft's: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        alpha = float(self.config["lora_alpha"])
        return alpha / math.sqrt(self.rank) if self.config.get("use_rslora") else alpha / self.rank

    def record(self) -> dict:
        return {"name": self.name, "global_step": self.global_step, "adapter_sha256": self.adapter_sha256,
                "r": self.rank, "lora_alpha": self.config["lora_alpha"],
                "use_rslora": bool(self.config.get("use_rslora")), "scaling": self.scaling}


@dataclass(frozen=True)
class TruncationError:
    """What an adapter of the members' rank would lose: per module, ||dW - dW_r||_F / ||dW||_F for the best rank-r
    approximation dW_r of the averaged update dW."""

    rank: int  # r: the members' largest rank
    largest: float
    module: str  # where the error is largest
    median: float
    modules: int

    def line(self) -> str:
        return (f"truncated to rank {self.rank}, the averaged update would be off by {percent(self.largest)} at "
                f"most (relative Frobenius error of the truncated SVD, largest of {self.modules} modules: "
                f"{self.module}; median {percent(self.median)})")

    def record(self) -> dict:
        return {"rank": self.rank, "largest": self.largest, "module": self.module, "median": self.median,
                "modules": self.modules}


def percent(fraction: float) -> str:
    """3 significant digits, so that a small error does not print as 0.00%."""
    return f"{100 * fraction:.3g}%"


# ---- choosing and checking the members ---------------------------------------------------------------------------

def _label(names: list[str]) -> str:
    return "[" + ", ".join(names) + "]"


def last_distinct(found: list[Checkpoint], k: int) -> list[Checkpoint]:
    """The last `k` of a run's complete checkpoints (find_checkpoints' order: checkpoint-N by step, then
    final_adapter), one per training step: final_adapter holds the same weights as a checkpoint-N of its step, and
    counts only where no checkpoint-N has that step. Fewer when the run holds fewer."""
    by_step: dict[int, Checkpoint] = {}
    for ckpt in found:
        if ckpt.global_step not in by_step or by_step[ckpt.global_step].name == FINAL_ADAPTER:
            by_step[ckpt.global_step] = ckpt
    return [by_step[step] for step in sorted(by_step)][-k:] if k > 0 else []


def last_complete(found: list[Checkpoint], k: int, run_dir: str | Path) -> list[Checkpoint]:
    """--average_last K: the last K of the run's complete checkpoints `found`, of distinct steps (last_distinct).
    ConfigError (one line) when K is under 2 or the run holds fewer."""
    if k < 2:
        raise ConfigError(f"setting 'average_last' = {k}: use 2 or more.")
    chosen = last_distinct(found, k)
    if len(chosen) < k:
        raise ConfigError(f"setting 'average_last' = {k}: {run_dir} holds only {len(chosen)} complete checkpoint(s) of "
                          f"distinct steps ({', '.join(c.name for c in chosen) or 'none'}); use --average_last "
                          f"{len(chosen)} or fewer.")
    return chosen


def check_choice(chosen: list[Checkpoint], setting: str, value: str) -> list[Checkpoint]:
    """At least two members of distinct steps, in step order. ConfigError (one line) otherwise."""
    if len(chosen) < 2:
        raise ConfigError(f"setting '{setting}' = {value}: an average needs 2 or more checkpoints; name two or more "
                          f"complete checkpoints of the run.")
    seen: dict[int, str] = {}
    for ckpt in chosen:
        if ckpt.global_step in seen:
            raise ConfigError(f"setting '{setting}' = {value}: {seen[ckpt.global_step]} and {ckpt.name} are both "
                              f"step {ckpt.global_step} (the same weights, or the same name twice); name each "
                              f"checkpoint once.")
        seen[ckpt.global_step] = ckpt.name
    return sorted(chosen, key=lambda c: c.global_step)


def named_checkpoints(run_dir: str | Path, names: list[str], setting: str = "average") -> list[Checkpoint]:
    """The checkpoints `names` (checkpoint-N or final_adapter) of `run_dir`, each complete per its manifest, of
    distinct steps, in step order. ConfigError naming the first bad one and the fix; no weight is read."""
    run_dir = Path(run_dir)
    value = _label(names)
    chosen = []
    for name in names:
        if not (CHECKPOINT_RE.match(name) or name == FINAL_ADAPTER):
            raise ConfigError(f"setting '{setting}' = {value}: {name!r} is not a checkpoint name; name checkpoints "
                              f"of {run_dir} as checkpoint-N or {FINAL_ADAPTER}.")
        chosen.append(checkpoints.complete_named(run_dir, name, setting, value))
    return check_choice(chosen, setting, value)


def recorded_sha256(path: Path) -> str:
    """The adapter weights' sha256 as the checkpoint's manifest records it (hashed now when it records none)."""
    try:
        entry = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"][ADAPTER_WEIGHTS]
        return entry["sha256"]
    except (OSError, ValueError, KeyError):
        return sha256_file(path / ADAPTER_WEIGHTS)


def plain_lora_problem(config: dict) -> str | None:
    """Why an adapter_config.json is not a plain LoRA adapter whose update is s * B @ A, or None."""
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type is {config.get('peft_type')!r}, not LORA"
    for key, what in NOT_PLAIN_LORA.items():
        if config.get(key):
            return f"it sets {key} = {config[key]!r} ({what})"
    if config.get("bias", "none") != "none":
        return f"it sets bias = {config['bias']!r} (trained biases besides the LoRA update)"
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        return (f"it sets init_lora_weights = {init!r}, which changes the base weights (only True, False, 'gaussian' "
                f"and 'eva' leave them as they are)")
    return None


def _same(value):
    return sorted(value) if isinstance(value, list) else value


def load_members(chosen: list[Checkpoint], setting: str = "average") -> list[Member]:
    """Read the chosen checkpoints' adapter configs and check that their updates can be averaged: plain LoRA, one
    base model, the same targets. ConfigError (one line) otherwise. Reads no tensor."""
    value = _label([c.name for c in chosen])
    members = []
    for ckpt in chosen:
        try:
            config = json.loads((ckpt.path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"setting '{setting}' = {value}: {ckpt.path / ADAPTER_CONFIG} is unreadable ({err}); "
                              f"average complete checkpoints only.") from err
        problem = plain_lora_problem(config)
        if problem:
            raise ConfigError(f"setting '{setting}' = {value}: {ckpt.name} is not a plain LoRA adapter: {problem}; "
                              f"only plain LoRA updates (s * B @ A) can be averaged exactly.")
        members.append(Member(ckpt.name, ckpt.path, ckpt.global_step, config, recorded_sha256(ckpt.path)))
    first = members[0]
    for other in members[1:]:
        for key in SAME_IN_EVERY_MEMBER:
            if _same(first.config.get(key)) != _same(other.config.get(key)):
                raise ConfigError(f"setting '{setting}' = {value}: {first.name} and {other.name} differ in {key} "
                                  f"({first.config.get(key)!r} vs {other.config.get(key)!r}); average checkpoints of "
                                  f"one base model with the same LoRA targets (one run).")
    return members


def average_name(members: list[Member]) -> str:
    """average-400+450+474: the members' steps, ascending (distinct: check_choice). Many members: the first and last
    step and a hash of every member instead."""
    steps = [m.global_step for m in sorted(members, key=lambda m: m.global_step)]
    name = AVERAGE_PREFIX + "+".join(map(str, steps))
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha256("+".join(map(str, steps)).encode("utf-8")).hexdigest()[:8]
        name = f"{AVERAGE_PREFIX}{steps[0]}+{steps[-1]}-{digest}"
    return name


# ---- the exact average -------------------------------------------------------------------------------------------

def _pairs(tensors: dict[str, torch.Tensor], member: Member) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) of one adapter file; ConfigError for any tensor that is not a 2-D LoRA A or B matrix."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part = LORA_A if key.endswith(LORA_A) else LORA_B if key.endswith(LORA_B) else None
        if part is None or tensor.dim() != 2:
            raise ConfigError(f"{member.name}: {ADAPTER_WEIGHTS} holds {key} {tuple(tensor.shape)}, not a LoRA A or B "
                              f"matrix of a linear layer; only plain LoRA updates (s * B @ A) can be averaged.")
        modules.setdefault(key[:-len(part)], {})[part] = tensor
    pairs = {}
    for module, parts in modules.items():
        if set(parts) != {LORA_A, LORA_B}:
            raise ConfigError(f"{member.name}: {ADAPTER_WEIGHTS} holds only one of {module}'s LoRA A and B matrices; "
                              f"the adapter is damaged.")
        a, b = parts[LORA_A], parts[LORA_B]
        if a.shape[0] != member.rank or b.shape[1] != member.rank:
            raise ConfigError(f"{member.name}: {module} has rank {a.shape[0]}, its adapter_config.json says r = "
                              f"{member.rank}; per-module ranks cannot be averaged.")
        pairs[module] = (a, b)
    return pairs


def averaged_tensors(members: list[Member]) -> dict[str, torch.Tensor]:
    """The exact average of the members' updates as one LoRA adapter's tensors (float32, peft's key names):
    A = the A_i stacked as rows, B = [s_i B_i / K] side by side, to be used with scaling 1."""
    from safetensors.torch import load_file

    k = len(members)
    per_member = [_pairs(load_file(str(m.path / ADAPTER_WEIGHTS)), m) for m in members]
    modules = list(per_member[0])
    for member, pairs in zip(members[1:], per_member[1:]):
        if set(pairs) != set(modules):
            odd = sorted(set(pairs) ^ set(modules))[0]
            raise ConfigError(f"{members[0].name} and {member.name} adapt different modules (e.g. {odd}); average "
                              f"checkpoints of one run.")
    out = {}
    for module in modules:
        shapes = {(pairs[module][0].shape[1], pairs[module][1].shape[0]) for pairs in per_member}
        if len(shapes) != 1:
            raise ConfigError(f"{members[0].name} and the others disagree on the shape of {module} ({sorted(shapes)}); "
                              f"average checkpoints of one base model.")
        out[module + LORA_A] = torch.cat([pairs[module][0].float() for pairs in per_member], dim=0).contiguous()
        out[module + LORA_B] = torch.cat([pairs[module][1].float() * (m.scaling / k)
                                          for m, pairs in zip(members, per_member)], dim=1).contiguous()
    return out


def averaged_config(members: list[Member]) -> dict:
    """The first member's adapter_config.json as the average's: r = lora_alpha = the summed rank (scaling 1)."""
    rank = sum(m.rank for m in members)
    return {**members[0].config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
            "alpha_pattern": {}, "inference_mode": True}


def truncation_error(tensors: dict[str, torch.Tensor], rank: int) -> TruncationError:
    """Per module of an adapter with scaling 1 (averaged_tensors), the relative Frobenius error of the best rank-`rank`
    approximation of its update B @ A; the largest and the median over modules. An update that is all zero has
    error 0."""
    errors = {}
    for key in sorted(tensors):
        if not key.endswith(LORA_A):
            continue
        module = key[:-len(LORA_A)]
        a, b = tensors[key].double(), tensors[module + LORA_B].double()
        _, r_b = torch.linalg.qr(b)  # b = Q_B R_B
        _, r_a = torch.linalg.qr(a.T)  # a^T = Q_A R_A, so b @ a = Q_B (R_B R_A^T) Q_A^T
        sigma = torch.linalg.svdvals(r_b @ r_a.T)
        total = float((sigma ** 2).sum())
        errors[module.removeprefix("base_model.model.")] = math.sqrt(float((sigma[rank:] ** 2).sum()) / total) \
            if total > 0 else 0.0
    worst = max(errors, key=errors.get)
    ordered = sorted(errors.values())
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return TruncationError(rank, errors[worst], worst, median, len(errors))


def average_record(members: list[Member], report: TruncationError) -> dict:
    """What average.json holds, and what the evaluation's row and export's manifest repeat."""
    return {"average_of": [m.name for m in members], "global_step": members[-1].global_step,
            "members": [m.record() for m in members], "r": sum(m.rank for m in members), "lora_alpha":
            sum(m.rank for m in members), "truncated_svd_error": report.record(),
            "method": "exact: A = the members' A stacked, B = [s_i B_i / K] side by side, scaling 1"}


def write_average(members: list[Member], dest: str | Path, git_commit: str | None = None) -> TruncationError:
    """Write the exact average of `members` as a LoRA adapter directory `dest` (adapter_config.json,
    adapter_model.safetensors, average.json, manifest.json: the same manifest as a checkpoint's, with the members
    added). Written in a temporary directory beside `dest` and renamed into place: `dest` is absent or whole. An
    existing `dest` is replaced. Returns the truncated-SVD error report for the members' rank."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tensors = averaged_tensors(members)
    report = truncation_error(tensors, max(m.rank for m in members))
    record = average_record(members, report)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(averaged_config(members), indent=2), encoding="utf-8")
        (tmp / AVERAGE_INFO).write_text(json.dumps(record, indent=1), encoding="utf-8")
        readable(tmp)
        manifest = checkpoints.write_manifest(tmp, members[-1].global_step, git_commit)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "average_of": record["average_of"],
                                                "members": record["members"]}, indent=1), encoding="utf-8")
        if dest.exists():  # an older average of other weights (a member changed since): replaced whole
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def readable(directory: Path) -> None:
    """`directory` and the files under it as the umask allows: mkdtemp makes directories 0700 and some writers
    (safetensors, save_pretrained's shards) files 0600, which another user (a server, a colleague) could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def written_average(dest: str | Path, members: list[Member]) -> TruncationError | None:
    """The report of an average already written at `dest` from exactly these members (same names, steps and adapter
    sha256, and complete per its manifest), or None when it must be written (again)."""
    dest = Path(dest)
    try:
        record = json.loads((dest / AVERAGE_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wanted = [(m.name, m.global_step, m.adapter_sha256) for m in members]
    if [(m["name"], m["global_step"], m["adapter_sha256"]) for m in record.get("members", [])] != wanted:
        return None
    if checkpoints.adapter_problem(dest, require_manifest=True):
        return None
    return TruncationError(**record["truncated_svd_error"])


def describe(members: list[Member], report: TruncationError) -> str:
    """One line: what was averaged, the exact rank, and what the original rank would cost."""
    ranks = {m.rank for m in members}
    rank = sum(m.rank for m in members)
    how = f"{len(members)} x {ranks.pop()}" if len(ranks) == 1 else " + ".join(str(m.rank) for m in members)
    return (f"average of {', '.join(m.name for m in members)}: the exact mean of their LoRA updates, an adapter of "
            f"rank {rank} ({how}); {report.line()}")
