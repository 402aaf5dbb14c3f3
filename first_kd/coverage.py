"""Coverage of a top-k store: how much of the teacher's probability its k kept tokens hold.

A position's *top-k mass* is sum_j exp(logprob_j) over its k stored log-probs (full-vocabulary log-softmax
at temperature 1); 1 - mass is the teacher's tail that the store throws away. How much that matters
depends on the teacher: a fine-tuned 7B puts more than 95% of its mass in its top-5, a small pretrained
model much less. This module is the maths of measuring it, as pure numpy functions:

  * `topk_mass(logprobs [N, k]) -> [N]`: the mass of each row, in float64, clipped to [0, 1] (fp16
    rounding of stored log-probs can push a sum a hair above 1).
  * `MassAccumulator`: the summary of a whole store read chunk by chunk in bounded memory (`add` each
    chunk's log-probs, then `summary()`); `topk_mass_summary(logprobs)` is the same for one array.
  * `mass_curve(logprobs [N, K]) -> dict`: the top-j mass for every j = 1..K (the probe of `first-kd cache
    --probe-k K`): its mean, minimum and quantiles per j.
  * `probe_sequences(n_targets [S], n_positions) -> (indices [m], take [m])`: which positions a probe measures.
  * `suggest_k(curve, target) -> dict`: the smallest j whose mean (and whose p10) top-j mass reaches a target.
  * `top_p_counts(logprobs [N, k], p) -> [N]`: the ids a top-p (variable-k) cache keeps per row.

Quantiles. `pQ` is the inverted-CDF quantile (numpy's `method="inverted_cdf"`): the r-th smallest of the n
masses, r = max(1, ceil(Q/100 * n)), i.e. the smallest mass with at least Q% of positions at or below it.
`mass_curve` computes it exactly. `MassAccumulator` keeps no list of masses (a store may hold billions of
positions): it counts them in FINE_BINS equal bins over [0, 1] and reports, for the bin holding the r-th
smallest mass, the bin's upper edge (capped at the largest mass seen). So a summary quantile is never below
the exact one and exceeds it by at most 1 / FINE_BINS = 1e-5, far below the error of the masses themselves
(a stored fp16 log-prob moves its probability by up to 1.8e-4).

Histogram. HISTOGRAM_BINS equal bins over [0, 1], each holding [lo, hi) except the last, [0.95, 1] (numpy's
`np.histogram` convention), so the last bin counts the positions whose mass reaches 0.95.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

QUANTILES = (1, 5, 10, 25, 50, 75, 90)  # percent: the summary's p1 .. p90
HISTOGRAM_BINS = 20
FINE_BINS = 100_000  # resolution of MassAccumulator's quantiles: 1e-5
SUMMARY_METHOD = "topk-mass-v1"  # what a recorded summary was computed by (see the module docstring)
PROBE_SEED = 0
DEFAULT_TARGET = 0.95  # the coverage `first-kd inspect --coverage` suggests a k for by default
CURVE_DIGITS = 6  # the probe curve is recorded rounded to 1e-6 (K values per statistic in the store's attributes)


def histogram_edges(n_bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Edges [n_bins + 1] of n_bins equal bins over [0, 1]."""
    return np.linspace(0.0, 1.0, n_bins + 1)


def quantile_key(q: float) -> str:
    """The summary's name of percentile q: 10 -> "p10"."""
    return f"p{q:g}"


def _check_logprobs(logprobs, name: str = "logprobs") -> np.ndarray:
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 2 or lp.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, k] with k >= 1, got {lp.shape}")
    # -inf is a padding column of a variable-k row (probability 0); NaN or +inf is damage.
    if lp.size and not np.all(np.isfinite(lp) | (lp == -np.inf)):
        raise ValueError(f"{name} hold NaN or +inf values")
    return lp


def topk_mass(logprobs) -> np.ndarray:
    """Top-k mass of each row: sum_j exp(logprobs[:, j]) in float64, clipped to [0, 1].

    Args:
        logprobs: [N, k] log-probabilities (any float dtype; a store's fp16 values are read as they are).
    Returns:
        [N] float64.
    """
    lp = _check_logprobs(logprobs)
    return np.clip(np.exp(lp).sum(axis=1), 0.0, 1.0)


class MassAccumulator:
    """The coverage summary of a store's top-k log-probs, fed chunk by chunk (memory: FINE_BINS counters).

    The result depends only on the rows fed, in the order fed (the mean is a float64 sum in that order): a
    store read chunk by chunk from its first row gives the same summary whatever wrote it and however often
    its writing was interrupted."""

    def __init__(self):
        self.k: Optional[int] = None
        self.n = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.fine = np.zeros(FINE_BINS, dtype=np.int64)
        self.counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)

    def add(self, logprobs) -> np.ndarray:
        """Count the rows of `logprobs` [N, k]; returns their masses [N] (float64)."""
        lp = _check_logprobs(logprobs)
        if self.k is None:
            self.k = lp.shape[1]
        elif lp.shape[1] != self.k:
            raise ValueError(f"logprobs have {lp.shape[1]} columns, earlier chunks had {self.k}")
        mass = topk_mass(lp)
        if mass.size:
            self.n += mass.size
            self.total += float(mass.sum())
            self.min = min(self.min, float(mass.min()))
            self.max = max(self.max, float(mass.max()))
            self.fine += np.histogram(mass, bins=FINE_BINS, range=(0.0, 1.0))[0]
            self.counts += np.histogram(mass, bins=histogram_edges())[0]
        return mass

    def quantile(self, q: float) -> float:
        """Percentile q (0 < q <= 100) to within 1e-5 above the exact inverted-CDF one (module docstring)."""
        if not self.n:
            raise ValueError("no rows were added")
        rank = max(1, math.ceil(q / 100 * self.n))
        b = int(np.searchsorted(np.cumsum(self.fine), rank, side="left"))
        return float(min((b + 1) / FINE_BINS, self.max))

    def summary(self) -> dict:
        """The summary recorded as a store's `coverage` attribute (cache/README.md)."""
        if not self.n:
            raise ValueError("no rows were added")
        return {"method": SUMMARY_METHOD, "k": self.k, "n_positions": self.n, "mean": self.total / self.n,
                "min": self.min, "max": self.max,
                "quantiles": {quantile_key(q): self.quantile(q) for q in QUANTILES},
                "quantile_resolution": 1 / FINE_BINS,
                "histogram": {"edges": [round(float(e), 6) for e in histogram_edges()],
                              "counts": [int(c) for c in self.counts]}}


def topk_mass_summary(logprobs) -> dict:
    """`MassAccumulator.summary()` of one array of log-probs [N, k] (N >= 1)."""
    acc = MassAccumulator()
    acc.add(logprobs)
    return acc.summary()


def mass_curve(logprobs) -> dict:
    """The top-j mass curve of a probe: for j = 1..K, statistics of sum_{i<=j} exp(logprobs[:, i]).

    Args:
        logprobs: [N, K] the teacher's top-K log-probs per position, by decreasing probability (N >= 1).
    Returns:
        {"k": K, "n_positions": N, "mean": [K], "min": [K], "quantiles": {"p1": [K], ..., "p90": [K]}};
        entry j - 1 of each list is the top-j statistic (float64 cumulative sums clipped to 1, exact
        inverted-CDF quantiles), rounded to CURVE_DIGITS decimals.
    """
    lp = _check_logprobs(logprobs)
    if not lp.shape[0]:
        raise ValueError("logprobs hold no rows")
    cum = np.minimum(np.cumsum(np.exp(lp), axis=1), 1.0)  # [N, K]
    quantiles = np.quantile(cum, [q / 100 for q in QUANTILES], axis=0, method="inverted_cdf")  # [Q, K]

    def rounded(values) -> list:
        return [round(float(v), CURVE_DIGITS) for v in values]

    return {"k": lp.shape[1], "n_positions": lp.shape[0], "mean": rounded(cum.mean(axis=0)),
            "min": rounded(cum.min(axis=0)),
            "quantiles": {quantile_key(q): rounded(row) for q, row in zip(QUANTILES, quantiles)}}


def probe_sequences(n_targets, n_positions: int, seed: int = PROBE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Which positions a probe measures: whole sequences, taken in a seeded random order until they hold
    `n_positions` target positions (all of them when the store holds fewer), the last one cut short.

    Whole sequences, because the teacher must run over a sequence to reach any of its positions; a random
    order, because the first records of a data file may not be typical of it.

    Args:
        n_targets: [S] target positions of each sequence of the store (>= 1 each).
        n_positions: how many positions to probe (>= 1).
    Returns:
        (indices [m] int64 ascending, take [m] int64): probe the first take[i] target positions of sequence
        indices[i]; take sums to min(n_positions, sum(n_targets)).
    """
    n_targets = np.asarray(n_targets, dtype=np.int64)
    if n_positions < 1:
        raise ValueError(f"n_positions must be >= 1, got {n_positions}")
    order = np.random.default_rng(seed).permutation(len(n_targets))
    held = np.cumsum(n_targets[order])
    m = min(int(np.searchsorted(held, n_positions, side="left")) + 1, len(order))
    chosen, take = order[:m], n_targets[order[:m]].copy()
    if m and held[m - 1] > n_positions:
        take[-1] -= held[m - 1] - n_positions
    by_index = np.argsort(chosen)
    return chosen[by_index].astype(np.int64), take[by_index]


def first_reaching(values, target: float) -> Optional[int]:
    """The smallest j (1-based) with values[j - 1] >= target, or None."""
    hits = np.flatnonzero(np.asarray(values, dtype=np.float64) >= target)
    return int(hits[0]) + 1 if hits.size else None


def suggest_k(curve: dict, target: float) -> dict:
    """The k a probe curve (`mass_curve`) says reaches `target` coverage.

    Returns {"target", "k_mean": the smallest j whose mean top-j mass >= target, "k_p10": the smallest j
    whose p10 top-j mass >= target (90% of positions keep at least `target`)}; None where no j <= K does.
    """
    return {"target": target, "k_mean": first_reaching(curve["mean"], target),
            "k_p10": first_reaching(curve["quantiles"]["p10"], target)}


def coverage_verdict(summary: dict, probe: Optional[dict], target: float) -> dict:
    """Whether a store's k reaches `target` coverage, and the k that would (from its probe, when it has one).

    Args:
        summary: the store's `coverage` summary (`MassAccumulator.summary`).
        probe: its `coverage_probe` record (`mass_curve` plus settings) or None.
    Returns:
        {"target", "k": the store's k, "mean", "p10": its top-k mass statistics, "reaches_mean": mean >= target,
         "reaches_p10": p10 >= target, "probe_k": K or None, "k_mean", "k_p10": `suggest_k` of the probe
         (None without a probe, or when no j <= K reaches the target)}.
    """
    mean, p10 = summary["mean"], summary["quantiles"]["p10"]
    hint = suggest_k(probe, target) if probe else {"k_mean": None, "k_p10": None}
    return {"target": target, "k": summary["k"], "mean": mean, "p10": p10, "reaches_mean": mean >= target,
            "reaches_p10": p10 >= target, "probe_k": probe["k"] if probe else None,
            "k_mean": hint["k_mean"], "k_p10": hint["k_p10"]}


def top_p_counts(logprobs, p: float) -> np.ndarray:
    """How many leading ids of each top-k row a top-p cache keeps: the smallest j whose top-j mass reaches p,
    capped at k (the row's width) when the whole top-k holds less than p.

    Args:
        logprobs: [N, k] full-vocabulary log-probs by decreasing probability (fp32 from the engine, before
            they are rounded to the store's fp16, so the choice does not depend on that rounding).
        p: the coverage target, 0 < p <= 1.
    Returns:
        [N] int64 in 1..k.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    lp = _check_logprobs(logprobs)
    reached = np.cumsum(np.exp(lp), axis=1) >= p
    k = lp.shape[1]
    return np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, k).astype(np.int64)
