"""longctx.data.collate.PadCollator: dynamic padding of ids, attention mask and labels; position ids for right padding."""

from __future__ import annotations

import torch

from longctx.data.collate import PadCollator
from longctx.labels import IGNORE_INDEX

PAD = 0
FEATURES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
    {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, -100, 11, 12]},
]


def test_right_padding():
    batch = PadCollator(pad_token_id=PAD)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD, PAD], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, IGNORE_INDEX, IGNORE_INDEX], [-100, -100, -100, 11, 12]]
    # every row counts its positions from 0, the padding after the tokens included (it carries no label)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_left_padding():
    batch = PadCollator(pad_token_id=PAD, padding_side="left")(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # left padding needs its mask: no positions
    assert batch["input_ids"].tolist() == [[PAD, PAD, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, -100, 6, 7], [-100, -100, -100, 11, 12]]


def test_pad_to_multiple_of():
    batch = PadCollator(pad_token_id=3, pad_to_multiple_of=4)(FEATURES)
    assert batch["input_ids"].shape == (2, 8)  # longest 5 -> next multiple of 4
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 3, 3, 3, 3, 3]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 5]
    assert batch["labels"][1].tolist() == [-100, -100, -100, 11, 12] + [IGNORE_INDEX] * 3
    assert batch["position_ids"].tolist() == [list(range(8))] * 2


def test_pad_to_multiple_of_already_a_multiple():
    batch = PadCollator(pad_token_id=PAD, pad_to_multiple_of=5)(FEATURES)
    assert batch["input_ids"].shape == (2, 5)


def test_attention_mask_marks_pads_even_when_pad_id_occurs_in_text():
    """The mask comes from lengths, not from comparing ids with the pad id."""
    features = [{"input_ids": [PAD, 4], "labels": [-100, 4]}, {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    batch = PadCollator(pad_token_id=PAD)(features)
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_prompts_without_labels():
    features = [{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5, 6]}]
    batch = PadCollator(pad_token_id=PAD, padding_side="left")(features)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[PAD, PAD, 1, 2], [3, 4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_pad_to_length_pads_every_batch_to_one_length():
    """Sequence parallelism on CPU: gloo's all_gather needs the same shape on every rank, whatever each batch holds."""
    collate = PadCollator(pad_token_id=PAD, pad_to_length=6)
    one, both = collate(FEATURES[:1]), collate(FEATURES)
    assert one["input_ids"].tolist() == [[5, 6, 7, PAD, PAD, PAD]]
    assert one["labels"].tolist() == [[-100, 6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert one["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]]
    assert both["input_ids"].shape == (2, 6) and both["attention_mask"].sum(dim=1).tolist() == [3, 5]


def test_pad_to_length_refuses_a_longer_sample():
    import pytest

    with pytest.raises(ValueError, match="^a sample of 5 tokens is longer than pad_to_length 4$"):
        PadCollator(pad_token_id=PAD, pad_to_length=4)(FEATURES)


def test_sequence_parallel_padding_per_machine():
    from longctx.model.sequence_parallel import collator_padding

    assert collator_padding(1, 1000, None, cuda=False) == {"pad_to_multiple_of": None}  # SP off: as configured
    assert collator_padding(1, 1000, 8, cuda=True) == {"pad_to_multiple_of": 8}
    assert collator_padding(4, 1000, None, cuda=True) == {"pad_to_multiple_of": 4}  # NCCL: any multiple of 4
    assert collator_padding(4, 1000, 8, cuda=True) == {"pad_to_multiple_of": 8}  # validated to be a multiple of 4
    assert collator_padding(4, 1000, None, cuda=False) == {"pad_to_length": 1000}  # 1000 = 4 x 250
    assert collator_padding(3, 1000, None, cuda=False) == {"pad_to_length": 1002}  # next multiple of 3: 3 x 334
