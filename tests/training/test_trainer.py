"""longctx.training.trainer.LongContextTrainer: the loss normalisation it relies on is refused when the Trainer does not
provide it. (Its numbers across processes and accumulation are checked end to end in test_equivalence.py, its
stops on non-finite values in test_faults.py.)"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from longctx.data.collate import PadCollator
from longctx.training.trainer import LongContextTrainer


@pytest.fixture()
def trainer(tiny_model, tiny_tokenizer, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", gradient_accumulation_steps=4,
                             use_cpu=True)
    return LongContextTrainer(model=tiny_model, args=args, data_collator=PadCollator(tiny_tokenizer.pad_token_id))


def batch(tokenizer) -> dict[str, torch.Tensor]:
    ids = tokenizer("The court found for the plaintiff and awarded damages.")["input_ids"]
    labels = [-100] * 4 + ids[4:]
    return PadCollator(tokenizer.pad_token_id)([{"input_ids": ids, "labels": labels}])


def test_training_without_num_items_in_batch_is_refused_naming_the_cause(trainer, tiny_tokenizer):
    trainer.model.train()
    with pytest.raises(RuntimeError) as err:
        trainer.compute_loss(trainer.model, batch(tiny_tokenizer), num_items_in_batch=None)
    assert str(err.value) == (
        "the Trainer passed no num_items_in_batch (the label tokens of the optimizer step) to compute_loss; the loss "
        "would be a per-micro-batch mean and, with loss_is_scaled_for_ga, the gradients 4 "
        "(gradient_accumulation_steps) times too large. Check that the batches carry 'labels' and that this "
        "transformers version still counts them.")


def test_evaluation_without_num_items_in_batch_is_the_batch_mean(trainer, tiny_tokenizer):
    """In evaluation the Trainer may pass none: the loss is then this batch's mean over its label tokens."""
    trainer.model.eval()
    inputs = batch(tiny_tokenizer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=None)
        logits = trainer.model(input_ids=inputs["input_ids"]).logits[0, :-1]
    targets = inputs["labels"][0, 1:]
    keep = targets != -100
    # mean cross-entropy over the label positions, computed from the full logits
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
