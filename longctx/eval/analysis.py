"""What a table of means cannot say, as pure functions over per-example ROUGE-Lsum: is one checkpoint better than
another on the same examples, and does quality hold as the prompts get longer.

- `paired_difference(a, b)`: the mean of a - b over the same examples with the 95% interval of the paired bootstrap
  (scipy.stats.bootstrap, paired=True: every resample draws the same examples for both). Two checkpoints scored on
  the same prompts are correlated: each one's own interval is wide (the examples differ in difficulty), but the
  difference varies far less, so the paired interval decides what the unpaired ones cannot. An interval that
  excludes 0 is a difference the examples support; one that includes 0 is "not distinguishable".
- `mean_interval(values)`: a mean with its 95% bootstrap interval (one length bucket's ROUGE-Lsum).
- `length_buckets(tokens)`: prompt-length buckets fixed by the data: quantiles (up to 4) with at least
  `min_examples` examples each, or given edges; a bucket with fewer examples is merged with a neighbour, so no
  bucket holds one example unless the whole set does.

Intervals are percentile intervals, as rouge_score's BootstrapAggregator gives the per-checkpoint ones, so the two
read alike; BCa (scipy's default) is undefined on degenerate data (two checkpoints with the same predictions, a bucket
where every prediction is empty) and warns there. 9,999 resamples (scipy's default), seeded per call: the same
numbers always give the same interval, whatever was computed before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 9999
SEED = 0
MAX_QUANTILE_BUCKETS = 4  # quartiles: enough to see a trend, few enough that each bucket holds a quarter of the data


@dataclass(frozen=True)
class Interval:
    """A mean over `n` examples with its bootstrap interval; low and high are None for fewer than 2 examples."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def _bootstrap(data: tuple[np.ndarray, ...], statistic, paired: bool, seed: int) -> tuple[float, float]:
    from scipy import stats

    result = stats.bootstrap(data, statistic, paired=paired, vectorized=True, method="percentile",
                             confidence_level=CONFIDENCE, n_resamples=RESAMPLES, batch=1000,
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _mean_difference(x, y, axis=-1):
    return np.mean(x - y, axis=axis)


def mean_interval(values: Sequence[float], seed: int = SEED) -> Interval:
    """Mean of `values` with its 95% percentile bootstrap interval."""
    data = np.asarray(values, dtype=float)
    if len(data) == 0:
        raise ValueError("no values")
    if len(data) < 2:
        return Interval(float(data.mean()), None, None, len(data))
    return Interval(float(data.mean()), *_bootstrap((data,), _mean, False, seed), len(data))


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = SEED) -> Interval:
    """Mean of a[i] - b[i] over the same examples with the 95% interval of the paired percentile bootstrap."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} values paired with {len(y)}")
    if len(x) == 0:
        raise ValueError("no values")
    if len(x) < 2:
        return Interval(float((x - y).mean()), None, None, len(x))
    return Interval(float((x - y).mean()), *_bootstrap((x, y), _mean_difference, True, seed), len(x))


@dataclass(frozen=True)
class Bucket:
    """Prompts with low < tokens <= high (None: no bound); `indices` into the examples, in their order."""

    low: int | None
    high: int | None
    indices: tuple[int, ...]

    @property
    def label(self) -> str:
        if self.low is None and self.high is None:
            return "all"
        if self.low is None:
            return f"≤ {self.high:,}"
        if self.high is None:
            return f"> {self.low:,}"
        return f"{self.low + 1:,}-{self.high:,}"


def quantile_edges(tokens: Sequence[int], min_examples: int, max_buckets: int = MAX_QUANTILE_BUCKETS) -> list[int]:
    """Inner edges of up to `max_buckets` equal-count buckets with at least `min_examples` each: the k-quantiles'
    values (the ceil(i n / k)-th smallest token count for i = 1 .. k-1, so bucket i holds the examples up to it)."""
    ordered = sorted(tokens)
    k = max(1, min(max_buckets, len(ordered) // min_examples))
    return sorted({ordered[math.ceil(i * len(ordered) / k) - 1] for i in range(1, k)})


def length_settings_problem(edges: Sequence[int] | None, min_examples: int) -> str | None:
    """Why `length_buckets` / `length_bucket_min_examples` cannot be used (the one-line error), or None."""
    if edges is not None and (not edges or any(e <= 0 for e in edges) or list(edges) != sorted(set(edges))):
        return (f"setting 'length_buckets' = {list(edges)!r}: use prompt token counts above 0 in increasing order, "
                f"e.g. --length_buckets 32768 65536 131072 262144, or leave it unset for quantiles.")
    if min_examples < 2:
        return (f"setting 'length_bucket_min_examples' = {min_examples!r}: use 2 or more (a bucket of one example "
                f"has no interval).")
    return None


def length_buckets(tokens: Sequence[int], edges: Sequence[int] | None = None, min_examples: int = 5) -> list[Bucket]:
    """Buckets of the examples by prompt token count: (-inf, e1], (e1, e2], ..., (ek, inf) for `edges` e1 < ... < ek,
    or the quantile edges when None. Empty buckets are left out; a bucket with fewer than `min_examples` examples is
    merged with its neighbour that holds fewer (ties: the shorter one), until every bucket has enough or one is
    left."""
    if min_examples < 1:
        raise ValueError(f"min_examples = {min_examples}: use 1 or more")
    edges = quantile_edges(tokens, min_examples) if edges is None else list(edges)
    bounds = [None, *edges, None]
    buckets = []
    for low, high in zip(bounds, bounds[1:]):
        inside = tuple(i for i, t in enumerate(tokens) if (low is None or t > low) and (high is None or t <= high))
        if inside:
            buckets.append(Bucket(low, high, inside))
    while len(buckets) > 1:
        small = [i for i, b in enumerate(buckets) if len(b.indices) < min_examples]
        if not small:
            break
        i = small[0]
        if i == 0:
            j = 1
        elif i == len(buckets) - 1:
            j = i - 1
        else:
            j = i - 1 if len(buckets[i - 1].indices) <= len(buckets[i + 1].indices) else i + 1
        lo, hi = min(i, j), max(i, j)
        merged = Bucket(buckets[lo].low, buckets[hi].high, tuple(sorted(buckets[lo].indices + buckets[hi].indices)))
        buckets[lo:hi + 1] = [merged]
    return buckets


def by_bucket(values: Sequence[float], buckets: Sequence[Bucket], seed: int = SEED) -> list[Interval]:
    """Mean of `values` (one per example) in each bucket, with its interval."""
    return [mean_interval([values[i] for i in bucket.indices], seed) for bucket in buckets]
