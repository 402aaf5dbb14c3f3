"""Accuracy and calibration metrics: pure functions over numpy or torch inputs, plus one streaming wrapper.

Two input forms, named explicitly everywhere:

  * **multi-class**: ``probs`` [N, C] (rows are probability vectors) and integer ``labels`` [N].
    The prediction is the argmax (first index on ties), its probability the *confidence*.
  * **top-label**: ``confidence`` [N] in [0, 1] and ``correct`` [N] (bool or 0/1), optionally the
    probability given to the gold label ``p_gold`` [N]. ``top_label_statistics`` turns the first
    form into this one; every calibration metric is defined on it.

Binning (used by ECE, MCE and the reliability table). Bins are half-open on the left, ``(lo, hi]``,
except that a confidence of exactly 0 falls in the first bin; a confidence of exactly 1 falls in the
last bin (the one whose upper edge is 1), never a bin of its own. This is the convention of
``np.searchsorted(edges[1:-1], confidence, side="left")``, which is also what
``sklearn.calibration.calibration_curve`` uses, so the two agree bin for bin.

  * ``strategy="uniform"``: ``n_bins`` equal-width bins, edges ``np.linspace(0, 1, n_bins + 1)``
    (10 bins by default, as in FIRST).
  * ``strategy="quantile"``: equal-mass bins (adaptive ECE). The interior edges are the
    ``np.quantile`` of the confidences at ``i / n_bins``; the outer edges are 0 and 1 so the bins
    still cover [0, 1]. Tied quantiles give zero-width bins that stay empty.

ECE = sum_b (n_b / N) * |acc_b - conf_b|; MCE = max_b |acc_b - conf_b| over non-empty bins.

Numbers are computed in float64 and returned as python floats; per-bin tables as numpy arrays
(NaN means for empty bins). Bad input raises ValueError naming the problem (these are API misuse,
not user configuration errors).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

STRATEGIES = ("uniform", "quantile")

# NLL clamps the gold probability at this floor so one token the model calls impossible costs
# -log(1e-12) ~= 27.6 nats instead of turning the mean into inf.
NLL_EPS = 1e-12

# Rows of `probs` must sum to 1 within max(ROW_SUM_ATOL, machine epsilon of their dtype): storing a
# probability rounds it by at most eps/2 relative, so a row's sum is off by at most eps/2 whatever
# the vocabulary size (bf16: eps = 2^-7). Tight enough to catch logits or log-probs passed by mistake.
ROW_SUM_ATOL = 1e-3

# Rows per chunk when reducing [N, C] probabilities, so a large vocabulary never gets a float64
# copy of the whole matrix (chunk * C stays around 2^22 elements, 32 MiB).
_CHUNK_ELEMENTS = 1 << 22

BIN_KEYS = ("lower", "upper", "count", "mean_confidence", "accuracy")


# --------------------------------------------------------------------------------------------
# input checking


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _as_float_vector(x: Any, name: str) -> np.ndarray:
    """Any array-like of shape [N] -> float64 numpy [N]; rejects empty, NaN/inf, wrong rank."""
    if _is_torch(x):
        x = x.detach().to("cpu").double().numpy()
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(arr.shape)}; flatten it first")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: metrics need at least one sample")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_confidence(confidence: Any, name: str = "confidence") -> np.ndarray:
    conf = _as_float_vector(confidence, name)
    if conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{conf.min():.4g}, {conf.max():.4g}]; "
            "pass probabilities, not logits or log-probs"
        )
    return conf


def _check_correct(correct: Any, n: int) -> np.ndarray:
    corr = _as_float_vector(correct, "correct")
    if corr.shape[0] != n:
        raise ValueError(f"lengths differ: confidence has {n} samples, correct has {corr.shape[0]}")
    if not np.all((corr == 0.0) | (corr == 1.0)):
        raise ValueError("correct must be bool or 0/1 per sample")
    return corr


def _check_top_label(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    conf = _check_confidence(confidence)
    return conf, _check_correct(correct, conf.shape[0])


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    return int(n_bins)


def _check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {STRATEGIES}")
    return strategy


# --------------------------------------------------------------------------------------------
# multi-class -> top-label


def top_label_statistics(probs: Any, labels: Any, row_sum_atol: Optional[float] = None) -> dict:
    """Per-sample statistics of a multi-class prediction.

    Args:
        probs: [N, C] probabilities (numpy or torch, any float dtype, any device); each row must
            lie in [0, 1] and sum to 1 within `row_sum_atol` (default: max(ROW_SUM_ATOL, eps of
            the dtype), see ROW_SUM_ATOL).
        labels: [N] integer gold class ids in [0, C). Drop ignored positions (e.g. -100) first.

    Returns:
        dict of float64 numpy [N] arrays:
          "confidence": max_c p_c;  "correct": 1.0 where argmax == label (first index on ties);
          "p_gold": p_label;  "brier": sum_c (p_c - onehot_c)^2 = sum_c p_c^2 - 2 p_label + 1.
    """
    import torch  # the package depends on torch; numpy inputs are wrapped without a copy

    p = probs if isinstance(probs, torch.Tensor) else torch.as_tensor(np.asarray(probs))
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {tuple(p.shape)}")
    if not (p.is_floating_point()):
        raise ValueError(f"probs must be floating point, got dtype {p.dtype}")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
    n, c = p.shape
    if n == 0 or c == 0:
        raise ValueError(f"probs is empty (shape {tuple(p.shape)}): metrics need at least one sample")
    if y.shape[0] != n:
        raise ValueError(f"lengths differ: probs has {n} rows, labels has {y.shape[0]}")
    y = y.to(p.device, torch.long)
    if row_sum_atol is None:
        row_sum_atol = max(ROW_SUM_ATOL, torch.finfo(p.dtype).eps)
    if int(y.min()) < 0 or int(y.max()) >= c:
        raise ValueError(
            f"labels must lie in [0, {c}), got values in [{int(y.min())}, {int(y.max())}]; "
            "drop ignored positions (e.g. -100) before computing metrics"
        )

    out = {k: np.empty(n, dtype=np.float64) for k in ("confidence", "correct", "p_gold", "brier")}
    rows = max(1, _CHUNK_ELEMENTS // c)
    for start in range(0, n, rows):
        block = p[start : start + rows].double()
        gold = y[start : start + rows]
        if not bool(torch.isfinite(block).all()):
            raise ValueError("probs contains NaN or inf")
        if float(block.min()) < 0.0 or float(block.max()) > 1.0:
            raise ValueError("probs must lie in [0, 1]; pass probabilities, not logits or log-probs")
        row_err = float((block.sum(dim=1) - 1.0).abs().max())
        if row_err > row_sum_atol:
            raise ValueError(
                f"probs rows must sum to 1 (off by up to {row_err:.3g} > {row_sum_atol:g}); "
                "apply softmax to logits first"
            )
        conf, pred = block.max(dim=1)
        p_gold = block.gather(1, gold[:, None])[:, 0]
        brier = (block * block).sum(dim=1) - 2.0 * p_gold + 1.0
        sl = slice(start, start + block.shape[0])
        out["confidence"][sl] = conf.cpu().numpy()
        out["correct"][sl] = (pred == gold).double().cpu().numpy()
        out["p_gold"][sl] = p_gold.cpu().numpy()
        # sum p^2 - 2 p_gold + 1 can round a hair below 0 for a one-hot correct row.
        out["brier"][sl] = brier.clamp(min=0.0).cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# binning


def bin_edges(confidence: Any, n_bins: int = 10, strategy: str = "uniform") -> np.ndarray:
    """[n_bins + 1] edges from 0 to 1. `confidence` [N] is only read for strategy="quantile"."""
    n_bins = _check_n_bins(n_bins)
    if _check_strategy(strategy) == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    conf = _check_confidence(confidence)
    edges = np.quantile(conf, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = 0.0, 1.0
    return edges


def assign_bins(confidence: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index [N] in [0, len(edges) - 2] under the (lo, hi] convention of the module docstring."""
    return np.searchsorted(edges[1:-1], confidence, side="left")


def bin_sums(confidence: Any, correct: Any, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, sum of confidence, sum of correct), each [len(edges) - 1] float64.

    Sums, not means, so they add across batches (what the streaming accumulator keeps)."""
    conf, corr = _check_top_label(confidence, correct)
    n_bins = len(edges) - 1
    idx = assign_bins(conf, edges)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(idx, weights=corr, minlength=n_bins)
    return count, conf_sum, correct_sum


def bins_from_sums(edges: np.ndarray, count: np.ndarray, conf_sum: np.ndarray, correct_sum: np.ndarray) -> dict:
    """The per-bin table from bin sums: {"lower","upper","count","mean_confidence","accuracy"}."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, correct_sum / count, np.nan)
    return {
        "lower": np.asarray(edges[:-1], dtype=np.float64).copy(),
        "upper": np.asarray(edges[1:], dtype=np.float64).copy(),
        "count": count.astype(np.int64),
        "mean_confidence": mean_conf,
        "accuracy": acc,
    }


def calibration_bins(confidence: Any, correct: Any, n_bins: int = 10, strategy: str = "uniform") -> dict:
    """Reliability table of top-label predictions.

    Args:
        confidence: [N] in [0, 1]; correct: [N] bool or 0/1.
        n_bins, strategy: see the module docstring (bins are (lo, hi], 0 -> first, 1 -> last).

    Returns:
        dict of numpy [n_bins] arrays: "lower", "upper" (edges), "count" (int64), and
        "mean_confidence", "accuracy" (float64, NaN for empty bins).
    """
    conf, corr = _check_top_label(confidence, correct)
    edges = bin_edges(conf, n_bins, strategy)
    return bins_from_sums(edges, *bin_sums(conf, corr, edges))


def ece_from_bins(bins: dict) -> float:
    """sum_b (n_b / N) |acc_b - conf_b| from a reliability table (empty bins contribute 0)."""
    count = np.asarray(bins["count"], dtype=np.float64)
    total = count.sum()
    if total <= 0:
        raise ValueError("the bins table holds no samples")
    nonempty = count > 0
    gap = np.abs(np.asarray(bins["accuracy"], float)[nonempty] - np.asarray(bins["mean_confidence"], float)[nonempty])
    return float(np.sum(count[nonempty] * gap) / total)


def mce_from_bins(bins: dict) -> float:
    """max_b |acc_b - conf_b| over the non-empty bins of a reliability table."""
    count = np.asarray(bins["count"], dtype=np.float64)
    nonempty = count > 0
    if not nonempty.any():
        raise ValueError("the bins table holds no samples")
    gap = np.abs(np.asarray(bins["accuracy"], float)[nonempty] - np.asarray(bins["mean_confidence"], float)[nonempty])
    return float(gap.max())


def expected_calibration_error(confidence: Any, correct: Any, n_bins: int = 10, strategy: str = "uniform") -> float:
    """ECE of top-label predictions: confidence [N] in [0, 1], correct [N] bool/0-1."""
    return ece_from_bins(calibration_bins(confidence, correct, n_bins, strategy))


def maximum_calibration_error(confidence: Any, correct: Any, n_bins: int = 10, strategy: str = "uniform") -> float:
    """MCE of top-label predictions: the largest |accuracy - mean confidence| of a non-empty bin."""
    return mce_from_bins(calibration_bins(confidence, correct, n_bins, strategy))


# --------------------------------------------------------------------------------------------
# proper scores and plain averages


def brier_score(probs: Any, labels: Any) -> float:
    """Multi-class Brier score: mean over N of sum_c (p_c - onehot(label)_c)^2, in [0, 2].

    probs [N, C] probabilities, labels [N] integer ids. For the binary top-label form use
    `top_label_brier_score(confidence, correct)`."""
    return float(np.mean(top_label_statistics(probs, labels)["brier"]))


def top_label_brier_score(confidence: Any, correct: Any) -> float:
    """Binary (top-label) Brier score: mean over N of (confidence - correct)^2, in [0, 1]."""
    conf, corr = _check_top_label(confidence, correct)
    return float(np.mean((conf - corr) ** 2))


def negative_log_likelihood(probs: Any, labels: Any, eps: float = NLL_EPS) -> float:
    """Mean -log p_label in nats from probs [N, C] and labels [N]; p_label is clamped at `eps`."""
    return gold_negative_log_likelihood(top_label_statistics(probs, labels)["p_gold"], eps)


def gold_negative_log_likelihood(p_gold: Any, eps: float = NLL_EPS) -> float:
    """Mean -log p in nats from the probability given to the gold label, p_gold [N] in [0, 1].

    p_gold is clamped at `eps` (default 1e-12, i.e. at most ~27.6 nats per sample) so a zero
    probability is a large finite penalty rather than inf."""
    p = _check_confidence(p_gold, "p_gold")
    return float(np.mean(-np.log(np.maximum(p, eps))))


def accuracy(probs: Any, labels: Any) -> float:
    """Fraction of rows of probs [N, C] whose argmax equals labels [N] (first index on ties)."""
    return float(np.mean(top_label_statistics(probs, labels)["correct"]))


def mean_confidence(probs: Any) -> float:
    """Mean over rows of probs [N, C] of the top probability."""
    p = probs if _is_torch(probs) else np.asarray(probs)
    if getattr(p, "ndim", 0) != 2:
        raise ValueError(f"probs must be [N, C], got shape {tuple(getattr(p, 'shape', ()))}")
    # Labels are irrelevant to confidence; zeros keep the shared validation path.
    zeros = np.zeros(p.shape[0], dtype=np.int64)
    return float(np.mean(top_label_statistics(probs, zeros)["confidence"]))


# --------------------------------------------------------------------------------------------
# summaries


SUMMARY_KEYS = ("accuracy", "ece", "mce", "brier", "nll", "mean_confidence", "n", "n_bins")
# The summary's numbers about the model, without the table setting n_bins: what a validation line of
# metrics.jsonl (as val_KEY) and a model entry of the demo's report.json carry.
MODEL_SUMMARY_KEYS = tuple(k for k in SUMMARY_KEYS if k != "n_bins")


def _summary(bins: dict, n: int, correct_sum: float, conf_sum: float,
             brier_sum: Optional[float], nll_sum: Optional[float]) -> dict:
    return {
        "accuracy": correct_sum / n,
        "ece": ece_from_bins(bins),
        "mce": mce_from_bins(bins),
        "brier": None if brier_sum is None else brier_sum / n,
        "nll": None if nll_sum is None else nll_sum / n,
        "mean_confidence": conf_sum / n,
        "n": int(n),
        "n_bins": int(len(bins["count"])),
    }


def calibration_summary(probs: Any, labels: Any, n_bins: int = 10, strategy: str = "uniform") -> dict:
    """Everything `metrics.json` holds for one model on one dataset.

    Args:
        probs: [N, C] probabilities; labels: [N] integer ids.

    Returns:
        {"accuracy", "ece", "mce", "brier" (multi-class), "nll" (nats, clamped at NLL_EPS),
         "mean_confidence", "n", "n_bins"}: python floats / ints. The matching reliability table is
        `calibration_bins(stats["confidence"], stats["correct"], ...)` with
        `stats = top_label_statistics(probs, labels)`.
    """
    stats = top_label_statistics(probs, labels)
    bins = calibration_bins(stats["confidence"], stats["correct"], n_bins, strategy)
    return _summary(
        bins,
        n=stats["confidence"].shape[0],
        correct_sum=float(stats["correct"].sum()),
        conf_sum=float(stats["confidence"].sum()),
        brier_sum=float(stats["brier"].sum()),
        nll_sum=float(np.sum(-np.log(np.maximum(stats["p_gold"], NLL_EPS)))),
    )


class CalibrationAccumulator:
    """Streaming `calibration_summary`: feed batches, read the summary of all of them at the end.

    `compute()` equals `calibration_summary` on the concatenated data (up to float summation
    order). With strategy="uniform" only per-bin sums and running totals are kept (O(n_bins)
    memory). With strategy="quantile" the bin edges depend on all the data, so the confidences and
    correctness of every sample are kept (16 bytes per sample) and binned at `compute()`.

    Batches may come as multi-class (`update(probs, labels)`) or top-label
    (`update_confidence(confidence, correct, p_gold=None)`). A summary's "brier" is the
    multi-class Brier and is None if any batch came without full probabilities; "nll" is None if
    any batch came without p_gold.
    """

    def __init__(self, n_bins: int = 10, strategy: str = "uniform"):
        self.n_bins = _check_n_bins(n_bins)
        self.strategy = _check_strategy(strategy)
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.correct_sum = 0.0
        self.conf_sum = 0.0
        self.brier_sum: Optional[float] = 0.0
        self.nll_sum: Optional[float] = 0.0
        if self.strategy == "uniform":
            self._edges = bin_edges(None, self.n_bins, "uniform")
            self._bin_sums = [np.zeros(self.n_bins) for _ in range(3)]
        else:
            self._samples: list[tuple[np.ndarray, np.ndarray]] = []

    def update(self, probs: Any, labels: Any) -> None:
        """Add a batch of multi-class predictions: probs [B, C], labels [B] integer ids."""
        stats = top_label_statistics(probs, labels)
        self._add(stats["confidence"], stats["correct"], stats["p_gold"], float(stats["brier"].sum()))

    def update_confidence(self, confidence: Any, correct: Any, p_gold: Any = None, brier: Any = None) -> None:
        """Add a batch of top-label predictions: confidence [B], correct [B], optional p_gold [B] and
        optional per-sample Brier scores [B] (without them the summary's "brier" is None)."""
        conf, corr = _check_top_label(confidence, correct)
        gold = None
        if p_gold is not None:
            gold = _check_confidence(p_gold, "p_gold")
            if gold.shape[0] != conf.shape[0]:
                raise ValueError(f"lengths differ: confidence has {conf.shape[0]} samples, p_gold has {gold.shape[0]}")
        brier_sum = None
        if brier is not None:
            values = np.asarray(brier, dtype=np.float64).reshape(-1)
            if values.shape[0] != conf.shape[0]:
                raise ValueError(f"lengths differ: confidence has {conf.shape[0]} samples, brier has {values.shape[0]}")
            brier_sum = float(values.sum())
        self._add(conf, corr, gold, brier_sum)

    def _add(self, conf: np.ndarray, corr: np.ndarray, p_gold: Optional[np.ndarray], brier_sum: Optional[float]) -> None:
        self.n += conf.shape[0]
        self.correct_sum += float(corr.sum())
        self.conf_sum += float(conf.sum())
        self.brier_sum = None if (self.brier_sum is None or brier_sum is None) else self.brier_sum + brier_sum
        if self.nll_sum is not None and p_gold is not None:
            self.nll_sum += float(np.sum(-np.log(np.maximum(p_gold, NLL_EPS))))
        else:
            self.nll_sum = None
        if self.strategy == "uniform":
            for total, part in zip(self._bin_sums, bin_sums(conf, corr, self._edges)):
                total += part
        else:
            self._samples.append((conf, corr))

    def bins(self) -> dict:
        """The reliability table of everything seen so far (same as `calibration_bins`)."""
        if self.n == 0:
            raise ValueError("CalibrationAccumulator is empty: call update() before compute()/bins()")
        if self.strategy == "uniform":
            return bins_from_sums(self._edges, *self._bin_sums)
        conf = np.concatenate([c for c, _ in self._samples])
        corr = np.concatenate([k for _, k in self._samples])
        return calibration_bins(conf, corr, self.n_bins, "quantile")

    def compute(self) -> dict:
        """The `calibration_summary` dict of everything seen so far."""
        return _summary(self.bins(), self.n, self.correct_sum, self.conf_sum, self.brier_sum, self.nll_sum)


# --------------------------------------------------------------------------------------------
# JSON round trip of a bins table (metrics.json / report inputs)


def bins_to_json(bins: dict) -> dict:
    """A bins table as plain lists, NaN -> None, so `json.dump` writes valid JSON."""
    out = {}
    for key in BIN_KEYS:
        values = np.asarray(bins[key]).tolist()
        out[key] = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
    return out


def bins_from_json(data: dict) -> dict:
    """Inverse of `bins_to_json`: lists (None for empty-bin means) -> numpy arrays."""
    missing = [k for k in BIN_KEYS if k not in data]
    if missing:
        raise ValueError(f"bins table lacks {missing}; expected keys {list(BIN_KEYS)}")
    out = {}
    for key in BIN_KEYS:
        values = [np.nan if v is None else v for v in data[key]]
        out[key] = np.asarray(values, dtype=np.int64 if key == "count" else np.float64)
    if len({len(v) for v in out.values()}) != 1:
        raise ValueError("bins table columns have different lengths")
    return out
