"""The model's shape, read without loading weights or touching the network.

Sources, first found wins: a local model directory's config.json; the local hub cache (offline, nothing is
downloaded); the experiment's model_architecture.json when it names this model (so a laptop without the weights
can plan the cluster run).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArchitectureError

ARCHITECTURE_FILE = "model_architecture.json"


@dataclass(frozen=True)
class Architecture:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None   # the longest context the model was trained for; None: not stated
    source: str = ""

    @classmethod
    def from_config(cls, values: dict[str, Any], source: str = "") -> Architecture:
        try:
            hidden, heads = int(values["hidden_size"]), int(values["num_attention_heads"])
            return cls(
                hidden_size=hidden,
                num_hidden_layers=int(values["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(values.get("num_key_value_heads") or heads),
                head_dim=int(values.get("head_dim") or hidden // heads),
                intermediate_size=int(values["intermediate_size"]),
                vocab_size=int(values["vocab_size"]),
                tie_word_embeddings=bool(values.get("tie_word_embeddings", False)),
                max_position_embeddings=(int(values["max_position_embeddings"])
                                         if values.get("max_position_embeddings") else None),
                source=source,
            )
        except KeyError as err:
            raise ArchitectureError(
                f"{source}: model config has no '{err.args[0]}'; the planner needs hidden_size, num_hidden_layers, "
                f"num_attention_heads, intermediate_size and vocab_size.") from err

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, q, kv, i = (self.hidden_size, self.num_attention_heads * self.head_dim,
                       self.num_key_value_heads * self.head_dim, self.intermediate_size)
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def sp_sizes(self) -> list[int]:
        """Every sequence_parallel_size > 1 the heads allow: query heads divisible by it, and KV heads divisible by it
        or it by them (they are then replicated)."""
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        return [n for n in range(2, heads + 1) if heads % n == 0 and (kv % n == 0 or n % kv == 0)]

    def num_parameters(self) -> int:
        """Linear weights + the four RMSNorms of each layer (input, post-attention, q, k) + embeddings + final norm."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden_size + 2 * self.head_dim
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * per_layer + self.hidden_size


def with_rope_yarn(arch: Architecture, factor: float | None) -> Architecture:
    """The architecture as the model is loaded with rope_yarn_factor (longctx.model.loading.apply_rope_yarn): positions
    up to factor x max_position_embeddings."""
    if factor is None or arch.max_position_embeddings is None:
        return arch
    return dataclasses.replace(arch, max_position_embeddings=int(arch.max_position_embeddings * factor))


def _read(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_architecture(model_name_or_path: str, experiment_dir: str | os.PathLike | None = None) -> Architecture:
    """A local directory's config.json; else the hub cache (offline, nothing downloaded); else the experiment's
    model_architecture.json when it describes this model."""
    local = Path(model_name_or_path) / "config.json"
    if local.is_file():
        return Architecture.from_config(_read(local), str(local))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_name_or_path, "config.json")
        if isinstance(cached, str) and Path(cached).is_file():
            return Architecture.from_config(_read(cached), cached)
    except Exception:  # noqa: BLE001 - not a hub id, no cache: fall through to the shipped values
        pass
    if experiment_dir is not None:
        shipped = Path(experiment_dir) / ARCHITECTURE_FILE
        if shipped.is_file():
            values = _read(shipped)
            if values.get("model_name_or_path") == model_name_or_path:
                return Architecture.from_config(values, str(shipped))
    raise ArchitectureError(
        f"setting 'model_name_or_path' = {model_name_or_path!r}: no config.json there, none in the local hub cache, "
        f"and no {ARCHITECTURE_FILE} for it next to the config; download the model, or add {ARCHITECTURE_FILE} "
        f"(its config.json values + \"model_name_or_path\") to the experiment.")


def readable_architecture(model_name_or_path: str, experiment_dir: str | os.PathLike | None = None) -> Architecture | None:
    """load_architecture, or None where it cannot be read here (validation then leaves the heads to DeepSpeed)."""
    try:
        return load_architecture(model_name_or_path, experiment_dir)
    except ArchitectureError:
        return None
