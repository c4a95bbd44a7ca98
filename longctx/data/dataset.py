"""Records -> prompt ids + target ids (longctx.data.chat) -> labels -> length policy -> length report.

One direction only: each record's document and summary go through longctx.data.chat.ChatFormat, which renders them with
the tokenizer's chat template and gives the prompt ids and the target ids (summary + end-of-turn token). Labels are
-100 on every prompt position, so the loss covers the summary and its end-of-turn token only. Samples longer than
max_seq_length are dropped or have their document cut (never the instruction or the summary); each one is listed in
OUTPUT_DIR/length_report.jsonl. Evaluation builds its prompts with the same ChatFormat, so they are these prompt ids.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..labels import IGNORE_INDEX
from ..run.layout import LENGTH_REPORT
from ..settings import DataArguments
from ..utils.atomic_write import write_atomic
from .chat import ChatFormat


def record_id(record: dict, index: int, data: DataArguments, split: str) -> str:
    """The record's id field, or <split>:<row> when it has none."""
    value = record.get(data.id_field)
    return f"{split}:{index}" if value is None else str(value)


def encode_record(record: dict, index: int, *, chat: ChatFormat, data: DataArguments, split: str) -> dict[str, Any]:
    """One record -> ids + labels + what the length policy did (for the report)."""
    sample = chat.encode(record[data.document_field], record[data.summary_field])
    keep = sample.action != "drop"
    return {
        "id": record_id(record, index, data, split),
        "input_ids": sample.prompt_ids + sample.target_ids if keep else [],
        "labels": [IGNORE_INDEX] * len(sample.prompt_ids) + sample.target_ids if keep else [],
        "length_action": sample.action,
        "length_reason": sample.reason,
        "prompt_tokens": len(sample.prompt_ids),
        "summary_tokens": len(sample.target_ids),
        "original_tokens": sample.original_tokens,
        "document_tokens_removed": sample.document_tokens_removed,
    }


def load_records(path: str | Path, split: str, max_samples: int | None = None, cache_dir: str | None = None):
    """datasets.Dataset of the raw records, cached by datasets (keyed on the file's content) in `cache_dir`
    (the datasets_cache_dir setting; None: HF_DATASETS_CACHE, else ~/.cache/huggingface/datasets). Tokenizing with
    .map() writes its cache files beside it, so every machine of a job must see the same directory."""
    from datasets import load_dataset

    kind = "parquet" if Path(path).suffix == ".parquet" else "json"
    dataset = load_dataset(kind, data_files={split: str(path)}, split=split, cache_dir=cache_dir)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset


def tokenize_split(path: str | Path, split: str, tokenizer, data: DataArguments, max_samples: int | None = None):
    """Tokenize one split with datasets.map (cached); returns (kept dataset of input_ids + labels, report rows).
    The template was checked when the run started (longctx.data.chat.check_template)."""
    raw = load_records(path, split, max_samples, data.datasets_cache_dir)
    encoded = raw.map(
        encode_record,
        with_indices=True,
        fn_kwargs={"chat": ChatFormat(tokenizer, data), "data": data, "split": split},
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
