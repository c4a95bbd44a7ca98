"""The HF Trainer with the project's loss and guards.

- Loss: cross-entropy over label positions only (longctx.model.loss), divided by the label tokens of the whole optimizer
  step (`num_items_in_batch`, counted by the Trainer over gradient accumulation and every process). One process
  with gradient accumulation N and N processes without it give the same loss, gradients and adapter (tested).
- Under sequence parallelism (longctx.model.sequence_parallel) the label tokens are counted from `shift_labels` on every
  rank and summed over all of them, the gradient multiplier is the data-parallel size (world / SP size), every SP
  rank logs the whole sample's loss, and a resume mid-epoch skips the inner dataloader's batches.
- Non-finite loss or gradient norm stops the run on every rank at once, naming the step, before the optimizer
  step, so no checkpoint holds non-finite weights.
- Log rows gain tokens/s per GPU, the peak GPU memory (largest over every rank; an evaluation's on its own row:
  longctx.training.telemetry) and the eval perplexity.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
import transformers.trainer
from transformers import Trainer

from ..errors import NonFiniteError
from ..model import sequence_parallel
from ..model.loss import summary_loss
from ..run import checkpoints
from ..run.layout import checkpoint_name
from ..utils.distributed import print0
from .telemetry import MemoryTelemetry, ThroughputMeter, perplexity


class LongContextTrainer(Trainer):
    # summary_loss divides by num_items_in_batch, the label tokens of the whole optimizer step, so the Trainer must
    # not divide by gradient_accumulation_steps again. That holds only when num_items_in_batch is given:
    # compute_loss refuses to train without it rather than make gradients N times too large.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Ask the Trainer to count label tokens per optimizer step (num_items_in_batch), shifted as our loss is.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self.throughput = ThroughputMeter()
        self.memory = MemoryTelemetry()
        self.sp_size = self.get_sp_size()

    def loss_multiplier(self, training: bool) -> int:
        """What the loss (a share of the label tokens counted over every process) is multiplied by: the number the
        gradients summed over processes are divided by, the process count under DDP / ZeRO; under SP what DeepSpeed
        divides by (longctx.sequence_parallel.gradient_average_size). In evaluation under SP (SP is off there) the
        Trainer has divided its count by the SP size: world / SP size makes the mean over ranks the loss again."""
        world = self.accelerator.num_processes
        if self.sp_size == 1:
            return world
        if not training:
            return world // self.sp_size
        stage = getattr(self.model_wrapped, "zero_optimization_stage", lambda: 0)()
        return sequence_parallel.gradient_average_size(world, self.sp_size, stage)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Under SP the batches carry `shift_labels`, not `labels`, and the Trainer counts nothing (it counts only
        "labels", then divides by the SP size): the label tokens of the optimizer step are counted here, each rank
        its slice of each micro-batch of its accumulation window, summed over every rank (not divided: each token
        is on exactly one rank)."""
        if self.sp_size == 1 or not batch_samples or "shift_labels" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        count = sequence_parallel.label_tokens(batch_samples).to(device)
        return self.accelerator.reduce(count, reduction="sum")

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.sp_size == 1:
            return model, train_dataloader
        from .sp_dataloader import resumable  # loads DeepSpeed: only under sequence parallelism

        return model, resumable(train_dataloader)  # set_epoch and resuming mid-epoch

    def _run_epoch(self, *args, **kwargs):
        """Under SP the Trainer's skip of already-trained batches (accelerate's skip_first_batches, which needs a
        real DataLoader) is replaced for this epoch by one that skips the inner dataloader's batches."""
        if self.sp_size == 1:
            return super()._run_epoch(*args, **kwargs)
        from .sp_dataloader import skip_first_batches_sp  # loads DeepSpeed: only under sequence parallelism

        with mock.patch.object(transformers.trainer, "skip_first_batches", skip_first_batches_sp):
            return super()._run_epoch(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and num_items_in_batch is None:
            raise RuntimeError(
                "the Trainer passed no num_items_in_batch (the label tokens of the optimizer step) to compute_loss; "
                "the loss would be a per-micro-batch mean and, with loss_is_scaled_for_ga, the gradients "
                f"{self.args.gradient_accumulation_steps} (gradient_accumulation_steps) times too large. Check that "
                "the batches carry 'labels' and that this transformers version still counts them.")
        share, _ = summary_loss(model, inputs, num_items_in_batch)
        loss = share
        if num_items_in_batch is not None and (self.args.average_tokens_across_devices or self.sp_size > 1):
            # num_items_in_batch counts every process's labels, and DDP / ZeRO average gradients over processes.
            loss = loss * self.loss_multiplier(model.training)
        if model.training and self.sp_size > 1:
            loss = self._whole_sample(loss, share)
        if model.training:
            self.throughput.add(int(inputs["attention_mask"].sum()))
            self._stop_if_nonfinite(loss.detach(), "training loss")
        return (loss, {"loss": loss}) if return_outputs else loss

    def _whole_sample(self, loss: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """Under SP each rank's `share` covers its slice of the sample. The Trainer logs the mean over all ranks of
        what compute_loss returns, and single-process training logs the step's whole loss; so every rank returns
        the sum of its SP group's shares x the data-parallel size as its value, with `loss`'s gradient."""
        shown = sequence_parallel.sp_sum(share) * (self.accelerator.num_processes // self.sp_size)
        return sequence_parallel.logged_as(loss, shown)

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer calls this once per optimizer step, after clipping and before `optimizer.step()`; under
        DeepSpeed the engine has already skipped its step when it saw the overflow (ZeRO's invalid-norm check), so
        either way the weights are still the previous step's when this raises."""
        norm = super()._get_grad_norm(model, grad_norm)
        if norm is not None:
            self._stop_if_nonfinite(torch.as_tensor(norm, dtype=torch.float32), "gradient norm")
        return norm

    def _stop_if_nonfinite(self, value: torch.Tensor, what: str) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(value).all() else 1.0, device=self.args.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            raise NonFiniteError(
                f"non-finite {what} at step {self.state.global_step + 1} (this process: {value.item()}); stopped "
                f"before the optimizer step, so no checkpoint holds it. Lower learning_rate, check the data around "
                f"this step, or resume from the last checkpoint.")

    def _save_checkpoint(self, model, trial):
        """The Trainer's save; a full disk ends the run with one line naming the last complete checkpoint
        (longctx.run.checkpoints.writing) instead of a torch.save traceback and a half-written checkpoint."""
        with checkpoints.writing(self.args.output_dir, Path(self.args.output_dir) / checkpoint_name(self.state.global_step)):
            super()._save_checkpoint(model, trial)

    def evaluate(self, *args, **kwargs):
        self.memory.evaluation_starts()  # the evaluation's peak is its own row's, not the next training row's
        return super().evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Called on every rank at the same points (memory is all-reduced here); rank 0 reports."""
        memory = None
        if "loss" in logs:
            rate = self.throughput.take()
            if rate is not None:
                logs["tokens_per_second_per_gpu"] = round(rate, 1)
            memory = self.memory.training_row()
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
            memory = self.memory.evaluation_row()
        if memory is not None:
            logs.update(memory[0])
            print0(f"step {self.state.global_step}: {memory[1]}")
        super().log(logs, start_time)
