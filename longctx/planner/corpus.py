"""The corpus the run plan schedules: how many samples each split keeps and how long they are.

Sources, best first, for each split:
  1. the length cache a previous run wrote (OUTPUT_DIR/token_lengths.json, longctx.data.length_cache), when it was
     made from this very file (sha256) with the same tokenization settings: training tokenizes the corpus anyway, so
     the plan of the next launch knows the real lengths;
  2. the data file itself: its records counted as training checks them (longctx.data.records.check_records), with the
     typical length from plan_tokens_per_sample (else max_seq_length);
  3. no file at hand (a laptop checking the cluster run): plan_train_records / plan_validation_records.
The plan names the source it used, and a data file it could not find.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.length_cache import max_samples, read_length_cache
from ..data.records import check_records
from ..run.layout import LENGTH_CACHE
from ..settings import DataArguments, ModelArguments


@dataclass
class Corpus:
    """One split as the plan sees it. `lengths` holds every kept sample's tokens when they are known; otherwise
    every kept sample is planned at `typical_tokens`."""

    split: str
    records: int | None          # None: unknown (no file, no setting): nothing can be scheduled
    dropped: int
    truncated: int
    typical_tokens: int
    lengths: list[int] | None
    prompt_lengths: list[int] | None   # prompt tokens of every kept sample, from the cache
    source: str

    @property
    def kept(self) -> int:
        return 0 if self.records is None else self.records - self.dropped

    def sample_tokens(self) -> list[int]:
        return list(self.lengths) if self.lengths is not None else [self.typical_tokens] * self.kept

    @property
    def longest_prompt(self) -> int | None:
        return max(self.prompt_lengths, default=0) if self.prompt_lengths is not None else None


def load_corpus(split: str, model: ModelArguments, data: DataArguments, output_dir: str | Path,
                planned_records: int | None, planned_tokens: int | None, counted: int | None = None) -> Corpus:
    """One split from the best source at hand (module docstring). `counted`: the records a caller has already
    counted with check_records (the launcher's preflight), so the file is not read twice."""
    data_file = data.train_file if split == "train" else data.validation_file
    limit = max_samples(split, data)
    typical = planned_tokens or data.max_seq_length
    typical_source = "plan_tokens_per_sample" if planned_tokens else "max_seq_length (plan_tokens_per_sample unset)"
    cache = Path(output_dir) / LENGTH_CACHE
    if data_file and Path(data_file).is_file():
        cached = read_length_cache(output_dir, split, data_file, model, data)
        if cached is not None:
            return Corpus(split, cached.records, cached.dropped, cached.truncated, typical, cached.lengths,
                          cached.prompt_lengths, f"{data_file} and its length cache {cache}")
        records = counted if counted is not None else check_records(data_file, data).count
        source = f"{records:,} records counted in {data_file}; tokens per sample from {typical_source} (no length " \
                 f"cache of this file in {cache})"
    else:
        records = planned_records
        setting = "plan_train_records" if split == "train" else "plan_validation_records / max_eval_samples"
        where = f"{data_file} is absent" if data_file else f"no {split} file is set"
        source = f"{where}: records from {setting}, tokens per sample from {typical_source}"
    if records is not None and limit is not None:
        records = min(records, limit)
    dropped, truncated = 0, 0
    if typical > data.max_seq_length:  # a typical sample over the limit: all of them are, as far as the plan knows
        if data.length_policy == "drop":
            dropped = records or 0
        else:
            truncated, typical = records or 0, data.max_seq_length
    return Corpus(split, records, dropped, truncated, typical, None, None, source)
