"""longctx.eval.metrics: ROUGE equals Google's rouge_score (stemmed, means of F) and hand-checked values."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from longctx.eval.metrics import ROUGE_TYPES, rouge, rouge_per_example, sentences_per_line

PAIRS = [  # (prediction, reference); multi-sentence texts carry their sentence breaks as newlines
    ("Acme Holdings sued Birch Logistics for negligence.", "Acme Holdings sued Birch Logistics for breach of lease."),
    ("The court found for the plaintiff.\nIt awarded 5000 dollars.",
     "The plaintiff won.\nThe court awarded 5000 dollars in damages."),
    ("Cobalt Mining lost its claim.", "The claim of Cobalt Mining was dismissed by the High Court."),
]


def test_rouge_equals_rouge_score_means():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_pair = [scorer.score(ref, pred) for pred, ref in PAIRS]
    expected = {name: sum(s[name].fmeasure for s in per_pair) / len(PAIRS) for name in ROUGE_TYPES}
    predictions, references = zip(*PAIRS)
    got = rouge(list(predictions), list(references))
    assert set(got) == set(ROUGE_TYPES)
    for name in ROUGE_TYPES:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name
    rows = rouge_per_example(list(predictions), list(references))
    assert [r["rouge1"] for r in rows] == pytest.approx([s["rouge1"].fmeasure for s in per_pair], abs=1e-12)
    assert len({round(r["rouge1"], 6) for r in rows}) == 3  # the pairs really differ


def test_rougelsum_splits_single_line_texts_into_sentences():
    prediction = "The court sat in Northvale. It found for Acme. Costs follow the event."
    reference = "It found for Acme. The court sat in Northvale."
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    split = scorer.score("It found for Acme.\nThe court sat in Northvale.",
                         "The court sat in Northvale.\nIt found for Acme.\nCosts follow the event.")["rougeLsum"]
    unsplit = scorer.score(reference, prediction)["rougeLsum"]
    assert split.fmeasure != pytest.approx(unsplit.fmeasure)  # sentence splitting matters for this pair
    assert rouge([prediction], [reference])["rougeLsum"] == pytest.approx(split.fmeasure, abs=1e-12)


def test_identical_texts_score_one():
    text = "Delta Foods sued Elm Street Bakery. The claim was dismissed."
    assert rouge([text], [text]) == pytest.approx({name: 1.0 for name in ROUGE_TYPES})


def test_disjoint_texts_score_zero():
    assert rouge(["apples bananas cherries"], ["kestrel software lantern hotels"]) == {name: 0.0 for name in
                                                                                       ROUGE_TYPES}


def test_small_overlap_by_hand():
    # prediction {the, cat, sat}, reference {the, cat, ran, away}: 2 unigrams shared.
    # rouge1: P = 2/3, R = 2/4, F = 2PR / (P + R) = 4/7.
    # rouge2: bigrams (the cat, cat sat) vs (the cat, cat ran, ran away): 1 shared, P = 1/2, R = 1/3, F = 2/5.
    # rougeL: longest common subsequence "the cat" = 2 tokens, so F = 4/7 as for rouge1.
    got = rouge(["the cat sat"], ["the cat ran away"])
    assert got["rouge1"] == pytest.approx(4 / 7, abs=1e-12)
    assert got["rouge2"] == pytest.approx(2 / 5, abs=1e-12)
    assert got["rougeL"] == pytest.approx(4 / 7, abs=1e-12)


def test_stemming_is_on():
    # Porter stems: courts -> court, ruled / rules -> rule; lower-cased. Every unigram then matches.
    assert rouge(["The courts ruled"], ["the court rules"])["rouge1"] == pytest.approx(1.0)


def test_mean_over_examples():
    got = rouge(["the cat sat", "same words here"], ["the cat ran away", "same words here"])
    assert got["rouge1"] == pytest.approx((4 / 7 + 1.0) / 2, abs=1e-12)


def test_length_mismatch_and_empty_input_are_errors():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        rouge([], [])


def test_sentences_per_line_splits_sentences():
    assert sentences_per_line("The court sat. It found for Acme. Costs follow.") == \
        "The court sat.\nIt found for Acme.\nCosts follow."


def test_every_line_is_split_into_sentences_too():
    # a newline is a boundary, never the only one; blank lines and the spaces around lines go
    text = "  One line.\n\nSecond line. Still the second line? Yes!\n"
    assert sentences_per_line(text) == "One line.\nSecond line.\nStill the second line?\nYes!"
    assert sentences_per_line("No full stop at all") == "No full stop at all"


@pytest.mark.parametrize("sentence", [
    "Smith v. Jones was decided by the U.S. Supreme Court in No. 12-345 on appeal from Acme Inc. and its parent.",
    "See Brown v. Board of Education, 347 U.S. 483, cited in Art. 5 para. 2 and in Sec. 12 of the Act.",
    "The claim against Birch Logistics Ltd. and Cobalt Mining Corp. was heard by Smith J. in the High Court.",
])
def test_legal_abbreviations_do_not_end_sentences(sentence):
    assert sentences_per_line(sentence) == sentence
    assert sentences_per_line(f"{sentence} The appeal was dismissed.") == f"{sentence}\nThe appeal was dismissed."


REFERENCE_LINES = [  # one sentence per line, split by hand
    "Smith v. Jones Inc. was decided by the U.S. Supreme Court in No. 12-345.",
    "The court held that the contract was void.",
    "Costs were awarded to the defendant under Sec. 4.",
]
PREDICTION_LINES = [
    "In No. 12-345 the U.S. Supreme Court decided Smith v. Jones Inc.",
    "It held the contract void and awarded costs to the defendant.",
]


def test_rouge_lsum_equals_rouge_score_on_sentences_split_by_hand():
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    expected = scorer.score("\n".join(REFERENCE_LINES), "\n".join(PREDICTION_LINES))["rougeLsum"].fmeasure
    # the raw texts: the reference with a paragraph break, the prediction on one line
    reference = f"{REFERENCE_LINES[0]} {REFERENCE_LINES[1]}\n\n{REFERENCE_LINES[2]}"
    prediction = " ".join(PREDICTION_LINES)
    assert rouge([prediction], [reference])["rougeLsum"] == pytest.approx(expected, abs=1e-12)
    assert 0.3 < expected < 0.9  # a partial match
    # rouge_score on the raw texts (a paragraph per line, the prediction one line) gives another number: the split
    # matters for this pair
    assert scorer.score(reference, prediction)["rougeLsum"].fmeasure != pytest.approx(expected, abs=1e-6)


def test_paragraph_breaks_and_one_line_of_the_same_sentences_score_one():
    reference = "\n\n".join(REFERENCE_LINES)
    prediction = " ".join(REFERENCE_LINES)
    assert rouge([prediction], [reference])["rougeLsum"] == pytest.approx(1.0, abs=1e-12)
