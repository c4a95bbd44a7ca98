"""The length cache: OUTPUT_DIR/token_lengths.json, what training's tokenization found about each split (records
read, dropped, truncated, and the tokens of every kept sample), so that the run plan of the next launch knows the
corpus's real lengths without tokenizing it again (longctx.planner.corpus reads it).

An entry is used only when it was made from this very file (sha256) with the same data settings and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..labels import IGNORE_INDEX
from ..run.layout import LENGTH_CACHE
from ..settings import DataArguments, ModelArguments
from ..utils.atomic_write import write_atomic
from ..utils.hashing import sha256_file

CACHE_VERSION = 1
# Settings that change neither which records are read nor how they are tokenized (the file's content is keyed by
# its sha256, and max_train_samples / max_eval_samples by the split's own "max_samples").
NOT_IN_KEY = {"train_file", "validation_file", "max_train_samples", "max_eval_samples", "preprocessing_num_workers",
              "pad_to_multiple_of", "id_field"}


@dataclass
class SplitLengths:
    """What the length pass found in one split."""

    records: int                 # records read (after max_train_samples / max_eval_samples)
    dropped: int                 # left out for length (length_policy: drop)
    truncated: int               # document cut to fit (length_policy: truncate_document)
    lengths: list[int]           # prompt + summary tokens of every kept sample
    prompt_lengths: list[int]    # prompt tokens (chat template + generation prompt) of every kept sample


def max_samples(split: str, data: DataArguments) -> int | None:
    return data.max_train_samples if split == "train" else data.max_eval_samples


def cache_key(split: str, data_file: str | Path, model: ModelArguments, data: DataArguments) -> dict:
    """What a cached length pass depends on: the file's bytes, the tokenizer, and every setting of the data path
    (new settings of DataArguments are included as they come)."""
    settings = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name not in NOT_IN_KEY}
    return {"data_sha256": sha256_file(data_file), "max_samples": max_samples(split, data),
            "tokenizer": model.tokenizer_name_or_path or model.model_name_or_path, **settings}


def token_counts(dataset) -> tuple[list[int], list[int]]:
    """(prompt + summary tokens, prompt tokens) of every sample of a tokenized split (columns input_ids and labels,
    labels IGNORE_INDEX on the prompt), read from Arrow in batches: no Python list of 200,000-token rows is made."""
    import numpy as np
    import pyarrow.compute as pc

    lengths: list[int] = []
    prompts: list[int] = []
    for batch in dataset.select_columns(["input_ids", "labels"]).with_format("arrow").iter(batch_size=64):
        lengths += pc.list_value_length(batch.column("input_ids")).to_pylist()
        for chunk in batch.column("labels").chunks:
            offsets = chunk.offsets.to_numpy(zero_copy_only=False)
            values = chunk.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
            starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
            # the first labelled position at or after each row's start; past the end (no label): the whole row
            labelled = np.append(np.flatnonzero(values != IGNORE_INDEX), len(values))
            first_label = labelled[np.searchsorted(labelled, starts)]
            prompts += (np.minimum(first_label, ends) - starts).tolist()
    return lengths, prompts


def write_length_cache(output_dir: str | Path, split: str, data_file: str | Path, model: ModelArguments,
                       data: DataArguments, dataset, report_rows: list[dict]) -> Path:
    """Record one split's length pass in OUTPUT_DIR/token_lengths.json (rank 0, after tokenize_split): `dataset` is
    the kept split it returned, `report_rows` its length report, `data_file` the file as configured (before any
    on_bad_record: skip copy, so that the plan of the next launch, which reads the configured file, finds it)."""
    path = Path(output_dir) / LENGTH_CACHE
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = _read_entries(path)
    lengths, prompt_lengths = token_counts(dataset)
    actions = [row["length_action"] for row in report_rows if row.get("split", split) == split]
    dropped = actions.count("drop")
    entries[split] = {"key": cache_key(split, data_file, model, data), "records": len(lengths) + dropped,
                      "dropped": dropped, "truncated": actions.count("truncate"), "lengths": lengths,
                      "prompt_lengths": prompt_lengths}
    return write_atomic(path, json.dumps({"version": CACHE_VERSION, "splits": entries}))


def read_length_cache(output_dir: str | Path, split: str, data_file: str | Path, model: ModelArguments,
                      data: DataArguments) -> SplitLengths | None:
    """The split's cached length pass when it was made from this file with these settings, else None."""
    entry = _read_entries(Path(output_dir) / LENGTH_CACHE).get(split)
    if not entry or not Path(data_file).is_file() or entry.get("key") != cache_key(split, data_file, model, data):
        return None
    return SplitLengths(entry["records"], entry["dropped"], entry["truncated"], entry["lengths"],
                        entry["prompt_lengths"])


def _read_entries(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or cut off by hand: the plan falls back to the settings
        return {}
    return content.get("splits", {}) if content.get("version") == CACHE_VERSION else {}
