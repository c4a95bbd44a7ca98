"""The HF Trainer with the project's loss and guards.

- Loss: cross-entropy over label positions only (longctx.loss), divided by the label tokens of the whole optimizer
  step (`num_items_in_batch`, counted by the Trainer over gradient accumulation and every process). One process
  with gradient accumulation N and N processes without it give the same loss, gradients and adapter (tested).
- Non-finite loss or gradient norm stops the run on every rank at once, naming the step, before the optimizer
  step, so no checkpoint holds non-finite weights.
- Log rows gain tokens/s per GPU, the peak GPU memory and the eval perplexity.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from .distributed import print0
from .loss import summary_loss
from .telemetry import ThroughputMeter, gpu_memory, perplexity


class NonFiniteError(RuntimeError):
    """Raised on every rank at once (the check is all-reduced), so no rank waits forever on the others."""


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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and num_items_in_batch is None:
            raise RuntimeError(
                "the Trainer passed no num_items_in_batch (the label tokens of the optimizer step) to compute_loss; "
                "the loss would be a per-micro-batch mean and, with loss_is_scaled_for_ga, the gradients "
                f"{self.args.gradient_accumulation_steps} (gradient_accumulation_steps) times too large. Check that "
                "the batches carry 'labels' and that this transformers version still counts them.")
        loss, _ = summary_loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's labels, and DDP / ZeRO average gradients over processes.
            loss = loss * self.accelerator.num_processes
        if model.training:
            self.throughput.add(int(inputs["attention_mask"].sum()))
            self._stop_if_nonfinite(loss.detach(), "training loss")
        return (loss, {"loss": loss}) if return_outputs else loss

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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            rate = self.throughput.take()
            if rate is not None:
                logs["tokens_per_second_per_gpu"] = round(rate, 1)
            memory = gpu_memory()
            if memory is not None:
                logs.update(memory[0])
                print0(f"step {self.state.global_step}: {memory[1]}")
        if "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        super().log(logs, start_time)
