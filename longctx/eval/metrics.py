"""ROUGE with Google's rouge_score (the reference implementation), as pure functions.

ROUGE-Lsum scores the longest common subsequences of sentences, one sentence per line. Every text, prediction and
reference alike, goes through the same splitter: lines at newlines, then every line into sentences by nupunkt, a
Punkt model trained on legal text that ships in its wheel (no download; pinned in requirements.txt, so the same text
always splits the same way). A newline is always a boundary, never the only one: a reference with paragraph breaks
and a one-line prediction of the same sentences score 1.0, and citations ("Smith v. Jones", "No. 12", "Acme Inc.",
"the U.S. Supreme Court") do not end sentences. An empty prediction scores 0.

Confidence intervals come from rouge_score's BootstrapAggregator (the resampling of the original ROUGE perl
script), seeded so that the same predictions always give the same interval.
"""

from __future__ import annotations

from importlib import metadata

import numpy as np
from nupunkt import sent_tokenize
from rouge_score import rouge_scorer, scoring

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def sentences_per_line(text: str) -> str:
    """One sentence per line: each line of `text` split into sentences (blank lines dropped)."""
    return "\n".join(sentence.strip() for line in text.splitlines() for sentence in sent_tokenize(line)
                     if sentence.strip())


def scoring_version() -> str:
    """What the scores depend on besides the predictions (part of the evaluation settings: a change scores again)."""
    return (f"rouge-score {metadata.version('rouge-score')} stemmed; rougeLsum sentences: lines, then nupunkt "
            f"{metadata.version('nupunkt')}")


def rouge_per_example(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """F-measure of each ROUGE type for each (prediction, reference) pair, as fractions in [0, 1]."""
    return fmeasures(score_pairs(predictions, references))


def fmeasures(per_example: list[dict[str, scoring.Score]]) -> list[dict[str, float]]:
    """The F-measure of each ROUGE type of each example of `score_pairs`."""
    return [{name: scores[name].fmeasure for name in ROUGE_TYPES} for scores in per_example]


def score_pairs(predictions: list[str], references: list[str]) -> list[dict[str, scoring.Score]]:
    """rouge_score's precision / recall / F-measure of each ROUGE type for each pair."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return [scorer.score(sentences_per_line(reference), sentences_per_line(prediction))
            for prediction, reference in zip(predictions, references)]


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F-measure over examples for ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum (stemmed)."""
    rows = rouge_per_example(predictions, references)
    if not rows:
        raise ValueError("no examples to score")
    return {name: sum(r[name] for r in rows) / len(rows) for name in ROUGE_TYPES}


def rouge_with_intervals(predictions: list[str], references: list[str], confidence: float = 0.95,
                         n_samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """`rouge` plus bootstrap confidence intervals: for each ROUGE type, the mean F-measure under its own name and
    the interval as `<type>_low` / `<type>_high` (fractions in [0, 1])."""
    return means_with_intervals(score_pairs(predictions, references), confidence, n_samples, seed)


def means_with_intervals(per_example: list[dict[str, scoring.Score]], confidence: float = 0.95,
                         n_samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """The means and intervals of `rouge_with_intervals` from the examples' scores (`score_pairs`).

    The interval is rouge_score's BootstrapAggregator (percentiles of `n_samples` resampled means). The mid value
    is the exact mean, as `rouge` returns it, not the aggregator's median of resampled means. The aggregator draws
    from NumPy's global generator, so it is seeded here and the caller's generator state is restored afterwards:
    the same inputs always give the same interval, and nothing else is disturbed.
    """
    if not per_example:
        raise ValueError("no examples to score")
    aggregator = scoring.BootstrapAggregator(confidence_interval=confidence, n_samples=n_samples)
    for scores in per_example:
        aggregator.add_scores({name: scores[name] for name in ROUGE_TYPES})
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        aggregate = aggregator.aggregate()
    finally:
        np.random.set_state(saved)
    out: dict[str, float] = {}
    for name in ROUGE_TYPES:
        out[name] = sum(scores[name].fmeasure for scores in per_example) / len(per_example)
        out[f"{name}_low"] = float(aggregate[name].low.fmeasure)
        out[f"{name}_high"] = float(aggregate[name].high.fmeasure)
    return out
