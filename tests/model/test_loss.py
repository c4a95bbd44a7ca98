"""longctx.model.loss.summary_loss: same loss and LoRA gradients as full-logit cross-entropy, step-level normalisation,
lm_head evaluated at label positions only, and no seq x seq attention mask for right-padded batches."""

from __future__ import annotations

import math

import pytest
import torch

from longctx.data.chat import ChatFormat
from longctx.data.collate import PadCollator
from longctx.data.dataset import encode_record
from longctx.labels import IGNORE_INDEX
from longctx.model.loading import apply_lora
from longctx.model.loss import label_positions, model_inputs, reference_loss, summary_loss
from longctx.settings import DataArguments, LoraArguments

FILLER = "The court reviewed the written submissions filed by both sides. "
CASES = [  # different document and summary lengths, so padding and per-batch label counts differ
    (2, "Acme Holdings sued Birch Logistics."),
    (5, "Cobalt Mining sued Delta Foods for negligence before the High Court of Eastmere. The claim was dismissed."),
    (1, "The court found for the plaintiff."),
    (3, "Falcon Airlines sued Granite Insurance for breach of contract. The court awarded 5000 dollars."),
]


@pytest.fixture()
def samples(tiny_tokenizer):
    data = DataArguments(max_seq_length=4096)
    out = []
    for i, (sentences, summary) in enumerate(CASES):
        rec = {"id": str(i), "document": f"CASE FILE {i}. " + FILLER * sentences, "summary": summary}
        enc = encode_record(rec, i, chat=ChatFormat(tiny_tokenizer, data), data=data, split="train")
        out.append({"input_ids": enc["input_ids"], "labels": enc["labels"]})
    assert len({len(s["input_ids"]) for s in out}) == len(out)
    return out


@pytest.fixture()
def collate(tiny_tokenizer):
    return PadCollator(pad_token_id=tiny_tokenizer.pad_token_id)


@pytest.fixture()
def lora_model(tiny_model):
    model = apply_lora(tiny_model, LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    # lora_B starts at zero (then lora_A gets no gradient); give both factors values so every gradient is non-zero
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model


def label_count(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def full_reference(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return reference_loss(logits, batch["labels"])


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    return grads


def test_summary_loss_equals_full_logit_cross_entropy(tiny_model, samples, collate):
    batch = collate(samples[:2])
    assert (batch["attention_mask"] == 0).any()  # padded
    with torch.no_grad():
        loss, count = summary_loss(tiny_model, batch)
        expected = full_reference(tiny_model, batch)
    assert count == label_count(batch) > 0
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert math.isfinite(loss.item()) and loss.item() > 0


def summary_loss_and_grads(model, batch) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """summary_loss of one batch, its label count and the LoRA gradients it gives (then cleared)."""
    loss, count = summary_loss(model, batch)
    loss.backward()
    grads = lora_grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), count, grads


def test_summary_loss_lora_gradients_equal_reference(lora_model, samples, collate):
    batch = collate(samples[:2])
    loss, _, ours = summary_loss_and_grads(lora_model, batch)

    expected_loss = full_reference(lora_model, batch)
    expected_loss.backward()
    reference = lora_grads(lora_model)

    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)
    assert ours.keys() == reference.keys()
    for name in reference:
        assert reference[name].abs().sum() > 0, f"{name} has no gradient: the comparison would be vacuous"
        torch.testing.assert_close(ours[name], reference[name], atol=1e-5, rtol=0, msg=name)


def test_num_items_in_batch_makes_micro_batches_sum_to_the_full_batch(lora_model, samples, collate):
    full = collate(samples)
    micro = [collate(samples[:2]), collate(samples[2:])]
    total = label_count(full)
    assert total == sum(label_count(m) for m in micro)

    full_loss, full_count = summary_loss(lora_model, full)
    full_loss.backward()
    full_grads = lora_grads(lora_model)
    lora_model.zero_grad(set_to_none=True)

    micro_losses = []
    for batch in micro:
        loss, count = summary_loss(lora_model, batch, num_items_in_batch=torch.tensor(total))
        assert count == label_count(batch)
        loss.backward()  # gradients accumulate as in gradient accumulation
        micro_losses.append(loss.detach())
    accumulated = lora_grads(lora_model)

    assert full_count == total
    assert sum(micro_losses).item() == pytest.approx(full_loss.item(), abs=1e-5)
    for name in full_grads:
        torch.testing.assert_close(accumulated[name], full_grads[name], atol=1e-5, rtol=0, msg=name)

    # the per-micro-batch mean (no num_items_in_batch) would differ: the check above is not vacuous
    with torch.no_grad():
        means = [summary_loss(lora_model, batch)[0] for batch in micro]
    assert abs(sum(means).item() / 2 - full_loss.item()) > 1e-4


def test_integer_num_items_in_batch(tiny_model, samples, collate):
    batch = collate(samples[:2])
    with torch.no_grad():
        mean, count = summary_loss(tiny_model, batch)
        scaled, _ = summary_loss(tiny_model, batch, num_items_in_batch=4 * count)
    assert scaled.item() == pytest.approx(mean.item() / 4, rel=1e-6)


def test_lm_head_sees_only_label_positions(tiny_model, samples, collate):
    batch = collate(samples[:2])
    seen = []
    hook = tiny_model.lm_head.register_forward_hook(
        lambda module, inputs, output: seen.append((tuple(inputs[0].shape), tuple(output.shape))))
    try:
        with torch.no_grad():
            _, count = summary_loss(tiny_model, batch)
            full_reference(tiny_model, batch)
    finally:
        hook.remove()
    (ours_in, ours_out), (ref_in, ref_out) = seen
    vocab, hidden = tiny_model.config.vocab_size, tiny_model.config.hidden_size
    assert count == label_count(batch)
    assert math.prod(ours_in[:-1]) == count and ours_in[-1] == hidden
    assert math.prod(ours_out[:-1]) == count and ours_out[-1] == vocab
    # the reference asks for every position: the hook measures what it should
    assert math.prod(ref_in[:-1]) == batch["input_ids"].numel() > count


@pytest.fixture()
def sdpa_masks(monkeypatch):
    """The attn_mask of every call of torch's SDPA (transformers' sdpa attention looks the function up per call)."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        mask = kwargs.get("attn_mask")
        seen.append(None if mask is None else tuple(mask.shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return seen


def test_a_right_padded_batch_gets_no_attention_mask_and_the_same_loss_and_gradients(lora_model, samples, collate,
                                                                                     sdpa_masks):
    batch = collate(samples[:2])
    longest = batch["input_ids"].shape[1]
    assert (batch["attention_mask"] == 0).any() and "position_ids" in batch  # padded on the right
    loss, _ = summary_loss(lora_model, batch)
    loss.backward()
    ours = lora_grads(lora_model)
    lora_model.zero_grad(set_to_none=True)
    layers = lora_model.config.num_hidden_layers
    assert sdpa_masks == [None] * layers  # SDPA ran its causal kernel: no mask was built
    sdpa_masks.clear()

    # the same batch as before this change (the mask, no positions): transformers builds a (2, 1, seq, seq) mask
    with_mask = {key: value for key, value in batch.items() if key != "position_ids"}
    expected, _ = summary_loss(lora_model, with_mask)
    expected.backward()
    reference = lora_grads(lora_model)
    assert sdpa_masks == [(2, 1, longest, longest)] * layers  # the mask the first run avoided: not vacuous
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for name in reference:
        assert reference[name].abs().sum() > 0, f"{name} has no gradient: the comparison would be vacuous"
        torch.testing.assert_close(ours[name], reference[name], atol=1e-5, rtol=0, msg=name)


def test_left_padding_keeps_its_mask():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    left = {"input_ids": ids, "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
            "position_ids": torch.arange(4).repeat(2, 1)}
    assert set(model_inputs(left)) == {"input_ids", "attention_mask", "position_ids"}
    right = {**left, "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}
    assert set(model_inputs(right)) == {"input_ids", "position_ids"}
    # without position ids (a batch not built by the training collator) the mask stays, whatever the padding
    assert set(model_inputs({"input_ids": ids, "attention_mask": right["attention_mask"]})) == {
        "input_ids", "attention_mask"}


def adapter_shift(labels: torch.Tensor) -> torch.Tensor:
    """What DeepSpeed's UlyssesSPDataLoaderAdapter does to labels (ulysses_sp.py): pad one -100 on the right, drop
    the first position."""
    return torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def test_shift_labels_mark_the_same_positions_and_targets_as_labels():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, 6, -100, -100]])
    # labels: position t predicts token t+1, so row 0 predicts 7 at 1 and 8 at 2; row 1 predicts 5 at 0 and 6 at 1
    keep, targets = label_positions({"labels": labels})
    assert keep.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert targets.tolist() == [7, 8, 5, 6]
    shifted = adapter_shift(labels)
    assert shifted.tolist() == [[-100, 7, 8, -100, -100], [5, 6, -100, -100, -100]]
    sp_keep, sp_targets = label_positions({"shift_labels": shifted})  # no second shift
    assert sp_keep.tolist() == keep.tolist() and sp_targets.tolist() == targets.tolist()
    # the adapter cuts shift_labels along the sequence: rank 1 of 2 holds positions 3-4 of a 6-token row
    half = label_positions({"shift_labels": torch.tensor([[-100, -100, -100, 4, 9, -100]])[:, 3:]})
    assert half[0].tolist() == [[True, True, False]] and half[1].tolist() == [4, 9]


def test_summary_loss_from_shift_labels_equals_the_loss_from_labels(lora_model, samples, collate):
    batch = collate(samples[:2])
    loss, count, expected = summary_loss_and_grads(lora_model, batch)
    sp_batch = {key: value for key, value in batch.items() if key != "labels"}
    sp_batch["shift_labels"] = adapter_shift(batch["labels"])
    sp_loss, sp_count, sp_grads = summary_loss_and_grads(lora_model, sp_batch)
    assert sp_count == count == label_count(batch)
    assert sp_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    for name, grad in sp_grads.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=0, msg=name)
