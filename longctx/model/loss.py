"""Loss over summary tokens only, without full-vocabulary logits for the prompt.

At 262,144 tokens, logits over every position would be 262,144 x 151,936 values (74 GiB in bf16). The summary
is a few hundred tokens, so the model is asked for hidden states -> lm_head only at the positions that predict a
label (transformers' `logits_to_keep` with a boolean mask), and cross-entropy is summed over those positions and
divided by the number of label tokens in the whole optimizer step (`num_items_in_batch`, counted by the Trainer
across gradient accumulation and processes). One large batch and the same tokens split over micro-batches and
processes then give the same loss and gradients.

Under sequence parallelism (longctx.model.sequence_parallel) a rank holds a slice of the sequence, and the batch carries
DeepSpeed's pre-shifted `shift_labels` instead of `labels`: position t of the slice predicts shift_labels[t], so the
mask is `shift_labels != -100` with no further shift, and only this slice's label positions reach lm_head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..labels import IGNORE_INDEX


def prediction_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, seq): True at position t when token t+1 is a label (causal shift)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def label_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label tokens in the order `hidden_states[prediction_mask]` returns their positions (row-major)."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE_INDEX]


def label_positions(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(boolean (batch, seq) mask of the positions whose next token is a label, the label tokens in the order
    `hidden_states[mask]` returns those positions), from `labels` or, under sequence parallelism, `shift_labels`."""
    if "shift_labels" in inputs:  # already shifted: position t predicts shift_labels[t]
        shifted = inputs["shift_labels"]
        keep = shifted != IGNORE_INDEX
        return keep, shifted[keep]
    labels = inputs["labels"]
    return prediction_mask(labels), label_targets(labels)


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row is its tokens followed by padding only (ones, then zeros)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def model_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model is given besides the loss arguments. A right-padded batch with position_ids (the training
    collator's) gets the positions and no attention mask: under causal attention a real token never sees the
    padding after it, and the padded positions carry no label, so the loss and gradients are the same, while a
    mask with padding in it would make transformers build a (batch, 1, seq, seq) mask under SDPA (64 GiB at
    262,144 tokens) and keep SDPA off its flash kernel. Any other batch keeps its mask."""
    mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
    if positions is not None and (mask is None or right_padded(mask)):
        return {"input_ids": inputs["input_ids"], "position_ids": positions}
    extra = {"position_ids": positions} if positions is not None else {}
    return {"input_ids": inputs["input_ids"], "attention_mask": mask, **extra}


def summary_loss(model, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None):
    """Sum of cross-entropy over label positions / number of label tokens.

    num_items_in_batch: label tokens in the whole optimizer step (all micro-batches, all processes); when None,
    the label tokens of this batch. Returns (loss, number of label tokens in this batch).
    """
    keep, targets = label_positions(inputs)
    outputs = model(**model_inputs(inputs), logits_to_keep=keep, use_cache=False)
    logits = outputs.logits  # (number of label tokens, vocab)
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
