"""Tiled MLP: every decoder layer's MLP runs over the sequence in tiles (the `tiled_mlp` switch).

    tiled_mlp: true              # config.yaml (MemoryArguments); `python -m longctx.planner` shows what it saves
    tiled_mlp_tile_tokens: 8192

tiled_mlp: every decoder layer's gated MLP (gate_proj / up_proj / down_proj, as in Qwen3, Llama, Mistral) runs over
the sequence in tiles through DeepSpeed's `TiledMLP` (deepspeed/runtime/sequence_parallel/ulysses_sp.py, the ALST
implementation): the forward keeps only the MLP input, and the backward recomputes the MLP tile by tile, so the
(tokens x intermediate_size) tensors exist for one tile at a time, in the forward, in the checkpointed recompute and
in the backward. Two things are added around it here:
  - the tile count is chosen so that `torch.chunk` really returns that many tiles; TiledMLP marks the trainable
    weights' gradients ready for ZeRO's reduction only at its last tile index, which otherwise never comes;
  - each tile's random state is recorded in the forward and replayed in the backward recompute, so LoRA dropout
    draws the same mask twice and the gradients are those of the loss actually computed (TiledMLP does not do this;
    torch's checkpoint does it for whole layers).
Under ZeRO-2 the trainable MLP weights are handed to TiledMLP as `compute_params`: their gradients, accumulated
over the tiles, are reduced once. Plain multi-process DDP would reduce them once per tile and fails; `validate`
rejects that combination.
"""

from __future__ import annotations

import math
import types

import torch

TILED_FORWARD_ATTR = "_longctx_tiled_mlp_tile_tokens"


def tile_count(seq_len: int, tile_tokens: int) -> int:
    """Tiles for `seq_len` tokens of at most `tile_tokens` each, counted as torch.chunk will actually cut them
    (chunk(n) can return fewer than n pieces; TiledMLP's last-tile bookkeeping needs the real count)."""
    if tile_tokens <= 0:
        raise ValueError(f"tile_tokens must be positive, got {tile_tokens}")
    wanted = max(1, math.ceil(seq_len / tile_tokens))
    size = math.ceil(seq_len / wanted)
    return math.ceil(seq_len / size)


class _TileRandomState:
    """Records the random state before each tile's forward and restores it before that tile's backward recompute.

    TiledMLP calls `fn` once per tile under no_grad in the forward, then once per tile, in the same order, with grad
    enabled in the backward. One instance serves one TiledMLP call (one layer, one forward)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.states: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.replayed = 0

    def _get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def __call__(self, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        original_forward = type(mlp).forward
        if not torch.is_grad_enabled():  # TiledMLP.forward
            self.states.append(self._get())
            return original_forward(mlp, x)
        # TiledMLP.backward: same tile order as the forward
        state, self.replayed = self.states[self.replayed], self.replayed + 1
        outer = self._get()
        self._set(state)
        try:
            return original_forward(mlp, x)
        finally:
            self._set(outer)


def _tiled_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Bound to each MLP instance as `forward`. The MLP is per token, so batch and sequence are flattened into one
    token axis and cut into tiles along it (the same cut TiledMLP's backward makes, so tile i is the same tokens in
    both, which the random-state replay relies on)."""
    tile_tokens = getattr(self, TILED_FORWARD_ATTR)
    flat = x.reshape(-1, x.shape[-1])
    tokens = flat.shape[0]
    if tokens <= tile_tokens:
        return type(self).forward(self, x)
    shards = tile_count(tokens, tile_tokens)
    if not torch.is_grad_enabled():
        # evaluation, or the first pass of reentrant checkpointing: nothing is kept for a backward, but the
        # intermediates of the whole sequence would still exist at once; compute tile by tile
        out = torch.cat([type(self).forward(self, tile) for tile in flat.chunk(shards, dim=0)], dim=0)
        return out.view(*x.shape[:-1], out.shape[-1])
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    compute_params = [p for p in self.parameters() if p.requires_grad]
    out = TiledMLP.apply(_TileRandomState(x.device), self, flat, shards, compute_params)
    return out.view(*x.shape[:-1], out.shape[-1])


def gated_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers' MLP modules: those with gate_proj, up_proj, down_proj and act_fn (Qwen3, Llama, ...)."""
    return [m for m in model.modules()
            if all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))]


def enable_tiled_mlp(model: torch.nn.Module, tile_tokens: int) -> int:
    """Run every gated MLP of `model` in tiles of `tile_tokens` tokens (per instance: the class stays untouched).
    Returns how many MLPs were switched; raises ValueError for a model without gated MLPs."""
    if tile_tokens <= 0:
        raise ValueError(f"setting 'tiled_mlp_tile_tokens' = {tile_tokens}: use a positive number of tokens.")
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP  # noqa: F401  (DeepSpeed >= 0.17)
    except ImportError as err:
        raise ValueError("setting 'tiled_mlp' = true needs DeepSpeed >= 0.17 (TiledMLP): pip install -r "
                         "requirements.txt, or set tiled_mlp: false.") from err
    mlps = gated_mlps(model)
    if not mlps:
        raise ValueError(f"setting 'tiled_mlp' = true: {type(model).__name__} has no gated MLP (gate_proj, up_proj, "
                         f"down_proj, act_fn) to tile; set tiled_mlp: false for this model.")
    for mlp in mlps:
        setattr(mlp, TILED_FORWARD_ATTR, tile_tokens)
        mlp.forward = types.MethodType(_tiled_mlp_forward, mlp)
    return len(mlps)


def disable_tiled_mlp(model: torch.nn.Module) -> int:
    """Undo enable_tiled_mlp; returns how many MLPs were switched back."""
    count = 0
    for mlp in gated_mlps(model):
        if hasattr(mlp, TILED_FORWARD_ATTR):
            del mlp.forward
            delattr(mlp, TILED_FORWARD_ATTR)
            count += 1
    return count
