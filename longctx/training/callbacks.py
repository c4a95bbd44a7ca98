"""The TrainerCallbacks this project adds: checkpoint manifests and the hang watchdog over steps and the end of
the run."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from ..run.checkpoints import write_manifest, writing
from ..run.layout import checkpoint_name
from ..utils.distributed import print0
from .watchdog import Watchdog

END_OF_RUN = "the end of the run (last eval and save, final adapter, teardown)"


class ManifestCallback(TrainerCallback):
    """Writes checkpoint-N/manifest.json after every rank has finished writing checkpoint-N, so that resume and
    evaluation can tell a complete checkpoint from one interrupted mid-save."""

    def __init__(self, git_commit: str | None):
        self.git_commit = git_commit

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # DeepSpeed ranks write their own optimizer shards
        if state.is_world_process_zero:
            path = Path(args.output_dir) / checkpoint_name(state.global_step)
            if path.is_dir():
                with writing(args.output_dir, path):
                    write_manifest(path, state.global_step, self.git_commit)
                print0(f"checkpoint complete: {path} (step {state.global_step})")


class WatchdogCallback(TrainerCallback):
    """No silent hang anywhere in the run.

    With `step_seconds` (step_timeout_seconds) every optimizer step is guarded from its first forward until the
    next step begins, so its eval and save, which the Trainer runs after on_step_end, are inside the guard. When the
    last step ends, `end` (watchdog_timeout_seconds) takes over: the Trainer's last eval and save, then the final
    adapter save and teardown in longctx.train, which disarms it at the very end."""

    def __init__(self, step_seconds: float | None, end: Watchdog):
        self.step = Watchdog(step_seconds, "step_timeout_seconds")
        self.end = end

    def on_step_begin(self, args, state, control, **kwargs):
        self.step.arm("each optimizer step, with its eval and save,")

    def on_step_end(self, args, state, control, **kwargs):
        # DefaultFlowCallback, which runs before this one, has set should_training_stop at the last step.
        if control.should_training_stop or state.global_step >= state.max_steps:
            self.step.disarm()
            self.end.arm(END_OF_RUN)
