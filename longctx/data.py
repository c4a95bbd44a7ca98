"""Records -> chat prompt + target -> token ids + labels -> length policy -> length report.

One direction only: a record {document, summary} becomes chat messages (user = instruction + document,
assistant = summary), the tokenizer's chat template turns them into text, and the text into ids. Labels are
-100 on every prompt position, so the loss covers the summary (and its end-of-turn token) only. Samples longer
than max_seq_length are dropped or have their document cut (never the instruction or the summary); each one is
listed in OUTPUT_DIR/length_report.jsonl.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from .files import write_atomic
from .records import DataError
from .settings import DataArguments

IGNORE_INDEX = -100
LENGTH_REPORT = "length_report.jsonl"


def build_messages(document: str, data: DataArguments, summary: str | None = None) -> list[dict[str, str]]:
    messages = []
    if data.system_prompt:
        messages.append({"role": "system", "content": data.system_prompt})
    messages.append({"role": "user", "content": f"{data.instruction}\n\n{document}"})
    if summary is not None:
        messages.append({"role": "assistant", "content": summary})
    return messages


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, document: str, data: DataArguments) -> list[int]:
    text = tokenizer.apply_chat_template(build_messages(document, data), add_generation_prompt=True, tokenize=False)
    return _ids(tokenizer, text)


def encode_pair(tokenizer, document: str, summary: str, data: DataArguments) -> tuple[list[int], list[int]]:
    """Prompt ids (with the generation prompt) and target ids (summary + end of turn), as the template renders."""
    prompt_text = tokenizer.apply_chat_template(build_messages(document, data), add_generation_prompt=True,
                                                tokenize=False)
    full_text = tokenizer.apply_chat_template(build_messages(document, data, summary), tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError("the tokenizer's chat template renders the conversation so that the prompt is not a prefix "
                        "of prompt + summary; use a template whose assistant turn follows the generation prompt.")
    return _ids(tokenizer, prompt_text), _ids(tokenizer, full_text[len(prompt_text):])


def fit_document(tokenizer, document: str, data: DataArguments, budget: int, encode) -> tuple[str, int] | None:
    """Cut the end of the document until encode(document) fits in budget tokens.

    Returns (document, tokens removed) or None when even an empty document does not fit. Cuts on token boundaries
    and re-encodes, because decoding and encoding again can merge tokens differently at the cut.
    """
    doc_ids = _ids(tokenizer, document)
    keep = len(doc_ids)
    for _ in range(8):
        overflow = encode(document) - budget
        if overflow <= 0:
            return document, len(doc_ids) - keep
        keep -= overflow
        if keep <= 0:
            return None
        document = tokenizer.decode(doc_ids[:keep])
    return None


def encode_record(record: dict, index: int, *, tokenizer, data: DataArguments, split: str) -> dict[str, Any]:
    """One record -> ids + labels + what the length policy did (for the report)."""
    document, summary = record[data.document_field], record[data.summary_field]
    record_id = record.get(data.id_field)
    record_id = f"{split}:{index}" if record_id is None else str(record_id)
    prompt_ids, target_ids = encode_pair(tokenizer, document, summary, data)
    total = len(prompt_ids) + len(target_ids)
    action, reason, removed = "keep", "", 0
    if total > data.max_seq_length:
        if data.length_policy == "drop":
            action, reason = "drop", "longer than max_seq_length"
        else:
            budget = data.max_seq_length - len(target_ids)
            fitted = fit_document(tokenizer, document, data, budget,
                                  lambda doc: len(encode_pair(tokenizer, doc, summary, data)[0]))
            if fitted is None:
                action, reason = "drop", "instruction + summary alone exceed max_seq_length"
            else:
                action, reason = "truncate", "document cut to fit max_seq_length"
                removed = fitted[1]
                prompt_ids, target_ids = encode_pair(tokenizer, fitted[0], summary, data)
    keep = action != "drop"
    return {
        "id": record_id,
        "input_ids": prompt_ids + target_ids if keep else [],
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids if keep else [],
        "length_action": action,
        "length_reason": reason,
        "prompt_tokens": len(prompt_ids),
        "summary_tokens": len(target_ids),
        "original_tokens": total,
        "document_tokens_removed": removed,
    }


def load_records(path: str | Path, split: str, max_samples: int | None = None):
    """datasets.Dataset of the raw records (cached by datasets, keyed on the file's content)."""
    from datasets import load_dataset

    kind = "parquet" if Path(path).suffix == ".parquet" else "json"
    dataset = load_dataset(kind, data_files={split: str(path)}, split=split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def tokenize_split(path: str | Path, split: str, tokenizer, data: DataArguments, max_samples: int | None = None):
    """Tokenize one split with datasets.map (cached); returns (kept dataset of input_ids + labels, report rows)."""
    raw = load_records(path, split, max_samples)
    encoded = raw.map(
        encode_record,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "data": data, "split": split},
        remove_columns=raw.column_names,
        num_proc=data.preprocessing_num_workers,
        desc=f"tokenize {split}",
    )
    report_columns = ["id", "length_action", "length_reason", "prompt_tokens", "summary_tokens",
                      "original_tokens", "document_tokens_removed"]
    info = encoded.select_columns(report_columns).to_list()
    report = [{"split": split, "max_seq_length": data.max_seq_length, **row} for row in info
              if row["length_action"] != "keep"]
    kept = encoded.filter(lambda action: action != "drop", input_columns="length_action")
    if len(kept) == 0:
        raise DataError(f"{path}: every one of its {len(encoded)} records is longer than max_seq_length="
                        f"{data.max_seq_length} tokens and was dropped; raise max_seq_length or set "
                        f"length_policy: truncate_document.")
    return kept.select_columns(["input_ids", "labels"]), report


def write_length_report(rows: list[dict], output_dir: str | Path, counts: dict[str, int]) -> str:
    """Write OUTPUT_DIR/length_report.jsonl (one row per dropped or truncated sample) and return the summary."""
    path = Path(output_dir) / LENGTH_REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    actions = Counter((row["split"], row["length_action"]) for row in rows)
    parts = [f"{split}: {counts[split]} records, {actions[(split, 'drop')]} dropped, "
             f"{actions[(split, 'truncate')]} truncated" for split in counts]
    return "length report: " + "; ".join(parts) + f" (details in {path})"
