"""longctx.planner.corpus: the length cache (written from a real tokenize_split, read back only for the same file and
settings), and where the plan takes each split's records and lengths from; the plan's schedule from a cache."""

from __future__ import annotations

import datasets
import pytest

from longctx.config import parse_config
from longctx.data.dataset import tokenize_split
from longctx.data.length_cache import read_length_cache, token_counts, write_length_cache
from longctx.planner import cli
from longctx.planner.corpus import load_corpus
from longctx.run.layout import LENGTH_CACHE
from longctx.settings import DataArguments, ModelArguments, Settings
from support import paths
from support.env import write_jsonl

MODEL = ModelArguments(model_name_or_path="tiny")
CONFIG_009 = str(paths.CONFIG_009)


@pytest.fixture(autouse=True)
def no_launch_size(monkeypatch):
    for name in ("NUM_PROCESSES", "NUM_MACHINES", "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)


def records(n: int, sentences) -> list[dict]:
    return [{"id": str(i), "document": "The court reviewed the submissions. " * sentences(i), "summary": "Dismissed."}
            for i in range(n)]


def test_token_counts_read_lengths_and_prompts_through_a_filter():
    rows = {"input_ids": [[1, 2, 3, 4], [5, 6], [7, 8, 9], [1]],
            "labels": [[-100, -100, 3, 4], [-100, 6], [-100, -100, -100], [1]]}
    kept = datasets.Dataset.from_dict(rows).filter(lambda ids: ids != [5, 6], input_columns="input_ids")
    # rows 0, 2, 3: lengths 4, 3, 1; prompts (leading -100s) 2, 3 (no label: the whole row), 0
    assert token_counts(kept) == ([4, 3, 1], [2, 3, 0])


def test_the_cache_of_a_real_length_pass_is_read_back_for_the_same_file_and_settings(tmp_path, tiny_tokenizer):
    data_file = write_jsonl(tmp_path / "train.jsonl", records(6, lambda i: 1 + 40 * (i % 2)))
    data = DataArguments(train_file=str(data_file), max_seq_length=200)
    kept, report = tokenize_split(data_file, "train", tiny_tokenizer, data)
    assert len(report) == 3 and len(kept) == 3  # the three long documents are dropped
    write_length_cache(tmp_path / "run", "train", data_file, MODEL, data, kept, report)
    cached = read_length_cache(tmp_path / "run", "train", data_file, MODEL, data)
    assert (cached.records, cached.dropped, cached.truncated) == (6, 3, 0)
    expected = [len(ids) for ids in kept["input_ids"]]
    assert cached.lengths == expected and all(n <= 200 for n in expected)
    assert cached.prompt_lengths == [labels.count(-100) for labels in kept["labels"]]
    # another max_seq_length, max_samples, tokenizer or file content: not this cache
    assert read_length_cache(tmp_path / "run", "train", data_file, MODEL,
                             DataArguments(train_file=str(data_file), max_seq_length=300)) is None
    assert read_length_cache(tmp_path / "run", "train", data_file, MODEL,
                             DataArguments(train_file=str(data_file), max_seq_length=200, max_train_samples=4)) is None
    assert read_length_cache(tmp_path / "run", "train", data_file, ModelArguments(model_name_or_path="other"),
                             data) is None
    assert read_length_cache(tmp_path / "run", "validation", data_file, MODEL, data) is None  # another split
    write_jsonl(data_file, records(6, lambda i: 2))
    assert read_length_cache(tmp_path / "run", "train", data_file, MODEL, data) is None


def test_where_a_split_comes_from(tmp_path):
    data = DataArguments(train_file=str(tmp_path / "absent.jsonl"), max_seq_length=1000, max_train_samples=50)
    absent = load_corpus("train", MODEL, data, tmp_path, 80, 600)
    assert (absent.records, absent.kept, absent.typical_tokens, absent.lengths) == (50, 50, 600, None)
    assert absent.source == (f"{tmp_path / 'absent.jsonl'} is absent: records from plan_train_records, tokens per "
                             f"sample from plan_tokens_per_sample")
    # a typical sample over max_seq_length: all dropped (drop) or all cut to it (truncate_document)
    assert load_corpus("train", MODEL, data, tmp_path, 80, 1200).kept == 0
    truncating = DataArguments(train_file=data.train_file, max_seq_length=1000, length_policy="truncate_document")
    cut = load_corpus("train", MODEL, truncating, tmp_path, 80, 1200)
    assert (cut.kept, cut.truncated, cut.typical_tokens) == (80, 80, 1000)
    # the file at hand: its records are counted, max_train_samples applies
    present = write_jsonl(tmp_path / "train.jsonl", records(7, lambda i: 1))
    counted = load_corpus("train", MODEL, DataArguments(train_file=str(present), max_train_samples=5), tmp_path,
                          80, None)
    assert (counted.records, counted.typical_tokens) == (5, 262_144)
    assert counted.source == (f"7 records counted in {present}; tokens per sample from max_seq_length "
                              f"(plan_tokens_per_sample unset) (no length cache of this file in "
                              f"{tmp_path / LENGTH_CACHE})")


def test_the_plan_schedules_the_cached_lengths(tmp_path, capsys):
    """009's settings on files of 10 training and 3 validation records whose cache says 2 were dropped and gives
    the lengths of the 8 kept (100,000 .. 240,000 tokens): 8 samples on 4 GPUs, 2 per GPU and epoch."""
    train = write_jsonl(tmp_path / "train.jsonl", records(10, lambda i: 1))
    validation = write_jsonl(tmp_path / "validation.jsonl", records(3, lambda i: 1))
    flags = ["--config", CONFIG_009, "--train_file", str(train), "--validation_file", str(validation),
             "--output_dir", str(tmp_path / "run")]
    lengths = [100_000 + 20_000 * i for i in range(8)]  # mean 170,000, longest 240,000; summaries of 500 tokens
    args = Settings.from_groups(parse_config(flags, check_this_machine=False)[0])  # the settings as training parses them
    model, data = args.model, args.data
    for split, path, kept, dropped in (("train", train, lengths, 2), ("validation", validation, [150_000] * 3, 0)):
        rows = {"input_ids": [[0] * n for n in kept], "labels": [[-100] * (n - 500) + [1] * 500 for n in kept]}
        write_length_cache(tmp_path / "run", split, path, model, data, datasets.Dataset.from_dict(rows),
                           [{"length_action": "drop"}] * dropped)
    assert cli.main(flags) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"  train: {train} and its length cache {tmp_path / 'run' / LENGTH_CACHE}" in out
    assert ("    10 records: 8 kept, 2 dropped, 0 truncated for length; 170,000 tokens per sample on average, longest "
            "240,000") in out
    # 8 samples / 4 GPUs = 2 micro-batches per GPU and epoch; ceil(2 / 8) = 1 step per epoch; 2 epochs: 2 steps;
    # save_steps 0.1: ceil(0.2) = 1 -> every step
    assert "  2 micro-batches per GPU and epoch -> 1 optimizer steps per epoch; 2 steps in all (2 epochs)" in out
    assert any(line.startswith("  checkpoints (save_steps 0.1 -> every 1 steps): 2, at steps 1, 2 (end)")
               for line in out)
    assert any(line.startswith("Evaluation plan per GPU") and "the longest prompt 149,500 tokens (length cache)" in line
               for line in out)
    # pinned host memory of the cached lengths only: 100,000 tokens x 2,560 x 2 = 0.48 GiB -> 512 MiB blocks;
    # 120,000 .. 200,000 -> 1 GiB; 220,000, 240,000 (1.05 .. 1.14 GiB) -> 2 GiB: 36 x 3.5 GiB = 126 GiB
    assert "  samples of 120,000 to 200,000 tokens: 36 layer inputs of up to 0.95 GiB, each rounded up to a cached " \
           "block of 1.00 GiB" in out
    assert any(line.startswith("  pinned per process 126.00 GiB + 4.00 GiB") for line in out)
