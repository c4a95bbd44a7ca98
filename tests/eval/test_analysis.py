"""longctx.eval.analysis: the paired bootstrap interval equals the exact bootstrap distribution on tiny samples
(every resample enumerated), bucket means and edges by hand, and the one-line errors of the length settings.

Pure functions: no model, no run."""

from __future__ import annotations

import itertools
import warnings
from collections import Counter

import numpy as np
import pytest

from longctx.eval import analysis


def exact_percentile_interval(d: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The percentile bootstrap interval of the mean of `d` from the exact bootstrap distribution: all n^n equally
    likely resamples (index tuples) enumerated, no random numbers. For each tail the atom where the distribution
    function first reaches alpha / 2 (resp. 1 - alpha / 2) is the quantile; returns (low, high, margin), where margin
    is how far alpha / 2 (and 1 - alpha / 2) lies from the distribution function's values just below and at those
    atoms, the smallest of the four."""
    n = len(d)
    means = np.array([sum(d[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n)])
    counts = Counter(np.round(means, 12))  # sums of the same values in another order may differ in the last bit
    cdf, atoms = 0.0, []
    for value in sorted(counts):
        atoms.append((value, cdf, cdf + counts[value] / len(means)))
        cdf += counts[value] / len(means)
    ends, margin = [], 1.0
    for p in ((1 - confidence) / 2, (1 + confidence) / 2):
        value, below, at = next(atom for atom in atoms if atom[2] >= p)
        ends.append(value)
        margin = min(margin, p - below, at - p)
    return ends[0], ends[1], margin


# Why scipy's Monte Carlo interval must equal the exact one here: with 9,999 resamples the fraction of resampled
# means below a value has a standard deviation of sqrt(0.025 * 0.975 / 9999) = 0.0016 around its exact
# probability. Each tail's exact quantile is an atom whose distribution function jumps past 0.025 (0.975) with at
# least the margin asserted below (>= 0.01, over 6 standard deviations) on both sides, so the order statistics that
# np.quantile interpolates between lie inside that atom: the interval is the atoms themselves, to rounding.
SD_OF_TAIL_FRACTION = (0.025 * 0.975 / analysis.RESAMPLES) ** 0.5


@pytest.mark.parametrize("d, expected", [
    # n = 6, differences -0.1 -0.1 0.1 0.1 0.3 0.3 (mean 0.1): the lower tail's atom is the mean of a resample with
    # four -0.1, one 0.1, one 0.3 (and the others of that sum), -0.2/6 = -1/30; the upper one 1.4/6 = 7/30.
    # The interval includes 0: not distinguishable, though the mean difference is +0.1.
    ([-0.1, -0.1, 0.1, 0.1, 0.3, 0.3], (-1 / 30, 7 / 30)),
    # n = 4, differences -0.05 0.3 0.3 0.4 (mean 0.2375): the lower atom is (-0.05 * 3 + 0.3) / 4 = 0.0375, the
    # upper (0.4 * 3 + 0.3) / 4 = 0.375. Excludes 0, though one example is worse.
    ([-0.05, 0.3, 0.3, 0.4], (0.0375, 0.375)),
])
def test_paired_interval_equals_the_exact_bootstrap_distribution(d, expected):
    b = np.array([0.40, 0.62, 0.35, 0.51, 0.20, 0.44][:len(d)])  # any scores: only a - b matters
    a = b + np.array(d)
    low, high, margin = exact_percentile_interval(list(a - b))
    assert (low, high) == pytest.approx(expected, abs=1e-12)  # the enumeration agrees with the hand computation
    assert margin >= 0.01 and margin / SD_OF_TAIL_FRACTION > 6  # the argument above holds for this sample

    got = analysis.paired_difference(list(a), list(b))
    assert got.mean == pytest.approx(sum(d) / len(d), abs=1e-12)
    assert (got.low, got.high) == pytest.approx(expected, abs=1e-12)
    assert got.n == len(d) and got.excludes_zero == (expected[0] > 0)
    assert analysis.paired_difference(list(a), list(b)) == got  # seeded: the same interval every time


def test_a_mean_interval_equals_the_exact_bootstrap_distribution():
    values = [0.55, 0.55, 0.75, 0.75, 0.95, 0.95]  # the first sample above shifted by 0.65
    low, high, margin = exact_percentile_interval(values)
    assert (low, high) == pytest.approx((0.65 - 1 / 30, 0.65 + 7 / 30), abs=1e-12) and margin >= 0.01
    got = analysis.mean_interval(values)
    assert (got.mean, got.low, got.high, got.n) == pytest.approx((0.75, low, high, 6), abs=1e-12)


def test_pairing_is_what_separates_two_correlated_checkpoints():
    """Examples differ in difficulty far more than the two checkpoints do: each one's own interval is wide and they
    overlap, but the second is better by 0.02 on every example, so every resampled mean difference is 0.02."""
    hard_to_easy = [0.10, 0.25, 0.40, 0.55, 0.70, 0.85]
    a, b = [x + 0.02 for x in hard_to_easy], hard_to_easy
    alone_a, alone_b = analysis.mean_interval(a), analysis.mean_interval(b)
    assert alone_a.low < alone_b.high  # unpaired intervals overlap
    paired = analysis.paired_difference(a, b)
    assert (paired.low, paired.high) == pytest.approx((0.02, 0.02), abs=1e-12) and paired.excludes_zero


def test_identical_predictions_differ_by_exactly_zero_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BCa would warn (DegenerateDataWarning) and give NaN here
        same = analysis.paired_difference([0.3, 0.5, 0.7], [0.3, 0.5, 0.7])
        empty = analysis.mean_interval([0.0, 0.0, 0.0, 0.0])
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    assert (empty.mean, empty.low, empty.high) == (0.0, 0.0, 0.0)


def test_one_example_has_no_interval_and_lengths_must_match():
    assert analysis.mean_interval([0.4]) == analysis.Interval(0.4, None, None, 1)
    one = analysis.paired_difference([0.4], [0.1])
    assert one.mean == pytest.approx(0.3) and one.low is None and not one.excludes_zero
    with pytest.raises(ValueError, match="2 values paired with 3"):
        analysis.paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])


# --- length buckets ------------------------------------------------------------------------------------------------

TOKENS = [476, 480, 597, 738, 603, 520, 690, 603, 650, 609, 500, 712]  # 12 prompts, like 000's validation set


def test_default_buckets_are_quantiles_with_at_least_the_minimum_each():
    # 12 examples, at least 5 each: 12 // 5 = 2 buckets. Sorted: 476 480 500 520 597 603 603 609 650 690 712 738;
    # the edge is the ceil(1 * 12 / 2) = 6th smallest, 603. The second 603 ties with it and goes below too:
    # 7 up to 603 (indices 0 1 2 4 5 7 10), 5 above.
    buckets = analysis.length_buckets(TOKENS)
    assert [(b.low, b.high, b.indices) for b in buckets] == [(None, 603, (0, 1, 2, 4, 5, 7, 10)),
                                                             (603, None, (3, 6, 8, 9, 11))]
    assert [b.label for b in buckets] == ["≤ 603", "> 603"]
    # At least 3 each: 12 // 3 = 4 buckets (quartiles): edges at the 3rd, 6th, 9th smallest = 500, 603, 650;
    # counts 3, 4 (with the tie), 2, 3; the 2-example bucket (604-650) is merged with its smaller neighbour, the
    # 3 above 650 (4 > 3): 604 and up.
    buckets = analysis.length_buckets(TOKENS, min_examples=3)
    assert [(b.label, len(b.indices)) for b in buckets] == [("≤ 500", 3), ("501-603", 4), ("> 603", 5)]
    # 400 examples of 400 distinct lengths: quartiles of 100 each (never more than 4)
    assert [len(b.indices) for b in analysis.length_buckets(list(range(1, 401)))] == [100, 100, 100, 100]
    # 9 examples, at least 5: one bucket, all of them
    assert [b.label for b in analysis.length_buckets(TOKENS[:9])] == ["all"]


def test_given_edges_leave_empty_buckets_out_and_merge_small_ones():
    # Edges 32,768 ... 262,144 on prompts under 1,000 tokens: one bucket, up to the first edge; the others are empty.
    edges = [32768, 65536, 131072, 262144]
    assert [(b.label, len(b.indices)) for b in analysis.length_buckets(TOKENS, edges)] == [("≤ 32,768", 12)]
    # Edges 500, 600, 700: up to 500: 3 (476 480 500); 501-600: 2 (597 520); 601-700: 5; above 700: 2 (738 712).
    # At least 3: 501-600 (2) merges with its smaller neighbour, up to 500 (3 <= 5): up to 600 holds 5; then the
    # last, above 700 (2), merges with 601-700: above 600 holds 7.
    buckets = analysis.length_buckets(TOKENS, [500, 600, 700], min_examples=3)
    assert [(b.label, b.indices) for b in buckets] == [("≤ 600", (0, 1, 2, 5, 10)),
                                                       ("> 600", (3, 4, 6, 7, 8, 9, 11))]


def test_bucket_means_by_hand():
    values = [0.6, 0.5, 0.7, 0.4, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.9, 0.2]
    buckets = analysis.length_buckets(TOKENS)
    # up to 603: indices 0 1 2 4 5 7 10 -> 0.6 0.5 0.7 0.8 0.6 0.7 0.9 = 4.8 / 7; above: 0.4 0.3 0.5 0.4 0.2 = 1.8 / 5
    short, long_ = analysis.by_bucket(values, buckets)
    assert (short.mean, short.n, long_.mean, long_.n) == pytest.approx((4.8 / 7, 7, 0.36, 5), abs=1e-12)
    assert 0.5 <= short.low < short.mean < short.high <= 0.9 and 0.2 <= long_.low < long_.mean < long_.high <= 0.5


@pytest.mark.parametrize("edges, min_examples, message", [
    ([65536, 32768], 5, "setting 'length_buckets' = [65536, 32768]: use prompt token counts above 0 in increasing "
                        "order, e.g. --length_buckets 32768 65536 131072 262144, or leave it unset for quantiles."),
    ([0, 100], 5, "setting 'length_buckets' = [0, 100]: use prompt token counts above 0"),
    ([100, 100], 5, "setting 'length_buckets' = [100, 100]: use prompt token counts above 0"),
    (None, 1, "setting 'length_bucket_min_examples' = 1: use 2 or more (a bucket of one example has no interval)."),
])
def test_bad_length_settings_are_one_line_naming_the_setting(edges, min_examples, message):
    assert analysis.length_settings_problem(edges, min_examples).startswith(message)
    assert analysis.length_settings_problem([32768, 65536], 5) is None
