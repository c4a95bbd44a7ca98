"""Loss over summary tokens only, without full-vocabulary logits for the prompt.

At 262,144 tokens, logits over every position would be 262,144 x 151,936 values (74 GiB in bf16). The summary
is a few hundred tokens, so the model is asked for hidden states -> lm_head only at the positions that predict a
label (transformers' `logits_to_keep` with a boolean mask), and cross-entropy is summed over those positions and
divided by the number of label tokens in the whole optimizer step (`num_items_in_batch`, counted by the Trainer
across gradient accumulation and processes). One large batch and the same tokens split over micro-batches and
processes then give the same loss and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, seq): True at position t when token t+1 is a label (causal shift)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def label_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label tokens in the order `hidden_states[prediction_mask]` returns their positions (row-major)."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def summary_loss(model, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None):
    """Sum of cross-entropy over label positions / number of label tokens.

    num_items_in_batch: label tokens in the whole optimizer step (all micro-batches, all processes); when None,
    the label tokens of this batch. Returns (loss, number of label tokens in this batch).
    """
    labels = inputs["labels"]
    keep = prediction_mask(labels)
    outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                    logits_to_keep=keep, use_cache=False)
    logits = outputs.logits  # (number of label tokens, vocab)
    targets = label_targets(labels)
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    count = targets.numel()
    denominator = count if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator, count


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Standard masked causal-LM cross-entropy over full logits (what the Trainer would compute); for tests."""
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    return F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
