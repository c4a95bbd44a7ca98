"""longctx.data.dataset: label masking, length policy + report, with the tiny tokenizer (000's). The real Qwen3 tokenizer
and templates: tests/test_chat.py."""

from __future__ import annotations

import json

import pytest

from longctx.data.chat import ChatFormat
from longctx.data.dataset import encode_record, tokenize_split, write_length_report
from longctx.errors import DataError
from longctx.labels import IGNORE_INDEX
from longctx.run.layout import LENGTH_REPORT
from longctx.settings import DataArguments
from support.env import write_jsonl

SENTENCE = "The court reviewed the written submissions filed by both sides. "
SUMMARY = "Acme Holdings sued Birch Logistics for negligence. The court found for the plaintiff."


def record(i: int, sentences: int, summary: str = SUMMARY) -> dict:
    return {"id": f"case-{i}", "document": f"CASE FILE {i}. " + SENTENCE * sentences, "summary": summary}


def encode(tokenizer, rec: dict, index: int = 0, data: DataArguments | None = None, split: str = "train") -> dict:
    data = data or DataArguments(max_seq_length=4096)
    return encode_record(rec, index, chat=ChatFormat(tokenizer, data), data=data, split=split)


def total_tokens(tokenizer, rec: dict, **data_kwargs) -> int:
    out = encode(tokenizer, rec, data=DataArguments(max_seq_length=10**9, **data_kwargs))
    assert out["length_action"] == "keep"
    return len(out["input_ids"])


# --- label masking ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("system_prompt", [None, "You are a careful court clerk."])
def test_labels_mask_exactly_the_prompt(tiny_tokenizer, system_prompt):
    data = DataArguments(max_seq_length=4096, system_prompt=system_prompt)
    rec = record(1, 3)
    out = encode(tiny_tokenizer, rec, 7, data)

    # The tiny template renders the assistant turn right after its generation prompt, so the prompt is exactly what
    # transformers renders and tokenizes with add_generation_prompt.
    messages = [{"role": "user", "content": f"{data.instruction}\n\n{rec['document']}"}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    prompt_ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    n = len(prompt_ids)
    ids, labels = out["input_ids"], out["labels"]
    assert out["id"] == "case-1" and out["length_action"] == "keep"
    assert ids[:n] == prompt_ids
    assert len(labels) == len(ids) > n
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:]
    assert IGNORE_INDEX not in labels[n:]
    # the summary and its end-of-turn token; the template's "\n" after <|im_end|> is never predicted, so not labelled
    assert tiny_tokenizer.decode(labels[n:]) == SUMMARY + "<|im_end|>"
    assert labels[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (out["prompt_tokens"], out["summary_tokens"]) == (n, len(ids) - n)
    if system_prompt:
        assert system_prompt in tiny_tokenizer.decode(ids[:n])


def test_record_without_id_is_named_by_split_and_row(tiny_tokenizer):
    rec = {"document": "A short document.", "summary": "Short."}
    out = encode(tiny_tokenizer, rec, 5, split="validation")
    assert out["id"] == "validation:5"


# --- length policy ----------------------------------------------------------------------------------------------


@pytest.fixture()
def mixed_split(tmp_path, tiny_tokenizer):
    """Two short records and one long one (in the middle); max_seq_length sits between them."""
    records = [record(0, 2), record(1, 20), record(2, 3)]
    lengths = [total_tokens(tiny_tokenizer, r) for r in records]
    assert max(lengths[0], lengths[2]) + 20 < lengths[1]
    limit = max(lengths[0], lengths[2]) + 10
    return write_jsonl(tmp_path / "train.jsonl", records), records, lengths, limit


def test_drop_removes_long_sample_and_reports_it(tiny_tokenizer, mixed_split):
    path, records, lengths, limit = mixed_split
    data = DataArguments(max_seq_length=limit, length_policy="drop")
    kept, report = tokenize_split(path, "train", tiny_tokenizer, data)

    expected = [encode(tiny_tokenizer, r, i, data) for i, r in enumerate(records) if i != 1]
    assert len(kept) == 2
    assert kept.column_names == ["input_ids", "labels"]
    assert [row["input_ids"] for row in kept] == [e["input_ids"] for e in expected]
    assert [row["labels"] for row in kept] == [e["labels"] for e in expected]

    assert len(report) == 1
    row = report[0]
    assert row["id"] == "case-1" and row["split"] == "train" and row["length_action"] == "drop"
    assert row["max_seq_length"] == limit
    assert row["original_tokens"] == lengths[1] == row["prompt_tokens"] + row["summary_tokens"]
    assert row["document_tokens_removed"] == 0


def test_truncate_document_keeps_instruction_and_summary(tiny_tokenizer, mixed_split):
    path, records, lengths, limit = mixed_split
    data = DataArguments(max_seq_length=limit, length_policy="truncate_document")
    kept, report = tokenize_split(path, "train", tiny_tokenizer, data)
    assert len(kept) == 3

    cut = kept[1]
    assert len(cut["input_ids"]) == limit  # English text: the cut falls between characters, the sample fills it
    text = tiny_tokenizer.decode(cut["input_ids"])
    assert data.instruction in text
    assert "CASE FILE 1." in text  # the start of the document stays; its end is cut
    assert text.count(SENTENCE.strip()) < 20
    targets = [t for t in cut["labels"] if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(targets) == SUMMARY + "<|im_end|>"
    # the untouched samples are exactly what encode_record gives
    assert kept[0]["input_ids"] == encode(tiny_tokenizer, records[0], 0, data)["input_ids"]

    assert len(report) == 1
    row = report[0]
    assert row["id"] == "case-1" and row["length_action"] == "truncate"
    assert row["document_tokens_removed"] == lengths[1] - limit  # exactly the overflow
    assert row["original_tokens"] == lengths[1]
    assert row["prompt_tokens"] + row["summary_tokens"] == len(cut["input_ids"])


def test_summary_longer_than_limit_is_dropped_even_with_truncate_document(tiny_tokenizer, tmp_path):
    long_summary = " ".join(["The court found for the plaintiff and awarded damages."] * 10)
    records = [record(0, 2), record(1, 2, summary=long_summary)]
    short_total = total_tokens(tiny_tokenizer, records[0])
    summary_ids = tiny_tokenizer(long_summary, add_special_tokens=False)["input_ids"]
    limit = short_total + 5
    assert len(summary_ids) > limit
    path = write_jsonl(tmp_path / "train.jsonl", records)
    kept, report = tokenize_split(path, "train", tiny_tokenizer,
                                  DataArguments(max_seq_length=limit, length_policy="truncate_document"))
    assert len(kept) == 1
    assert [(r["id"], r["length_action"]) for r in report] == [("case-1", "drop")]
    assert "summary" in report[0]["length_reason"]


def test_every_record_dropped_is_a_data_error(tiny_tokenizer, mixed_split):
    path, records, lengths, limit = mixed_split
    with pytest.raises(DataError) as info:
        tokenize_split(path, "train", tiny_tokenizer, DataArguments(max_seq_length=min(lengths) - 1))
    message = str(info.value)
    assert str(path) in message
    assert "every one of its 3 records" in message
    assert f"max_seq_length={min(lengths) - 1}" in message


def test_write_length_report_one_line_per_sample_and_summary(tiny_tokenizer, mixed_split, tmp_path):
    path, records, lengths, limit = mixed_split
    _, train_report = tokenize_split(path, "train", tiny_tokenizer, DataArguments(max_seq_length=limit))
    val_path = write_jsonl(tmp_path / "validation.jsonl", [record(10, 2), record(11, 20)])
    _, val_report = tokenize_split(val_path, "validation", tiny_tokenizer,
                                   DataArguments(max_seq_length=limit, length_policy="truncate_document"))
    rows = train_report + val_report
    out_dir = tmp_path / "run"
    summary = write_length_report(rows, out_dir, {"train": 3, "validation": 2})

    lines = (out_dir / LENGTH_REPORT).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert [(r["split"], r["id"], r["length_action"]) for r in rows] == [
        ("train", "case-1", "drop"), ("validation", "case-11", "truncate")]
    assert "train: 3 records, 1 dropped, 0 truncated" in summary
    assert "validation: 2 records, 0 dropped, 1 truncated" in summary
    assert str(out_dir / LENGTH_REPORT) in summary


def test_write_length_report_with_nothing_to_report(tmp_path):
    summary = write_length_report([], tmp_path, {"train": 4})
    assert (tmp_path / LENGTH_REPORT).read_text() == ""
    assert "train: 4 records, 0 dropped, 0 truncated" in summary
