"""ROUGE with Google's rouge_score (the reference implementation), as pure functions.

ROUGE-Lsum treats each line as a sentence. Texts that already contain newlines are used as they are; others are
split into sentences with NLTK's Punkt tokenizer with its default (untrained) parameters, which needs no data
download and so gives the same numbers on every machine.
"""

from __future__ import annotations

from nltk.tokenize.punkt import PunktSentenceTokenizer
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SPLITTER = PunktSentenceTokenizer()


def sentences_per_line(text: str) -> str:
    text = text.strip()
    if "\n" in text:
        return text
    return "\n".join(_SPLITTER.tokenize(text))


def rouge_per_example(predictions: list[str], references: list[str]) -> list[dict[str, float]]:
    """F-measure of each ROUGE type for each (prediction, reference) pair, as fractions in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(sentences_per_line(reference), sentences_per_line(prediction))
        rows.append({name: scores[name].fmeasure for name in ROUGE_TYPES})
    return rows


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F-measure over examples for ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum (stemmed)."""
    rows = rouge_per_example(predictions, references)
    if not rows:
        raise ValueError("no examples to score")
    return {name: sum(r[name] for r in rows) / len(rows) for name in ROUGE_TYPES}
