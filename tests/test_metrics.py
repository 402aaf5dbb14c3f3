"""Calibration metrics against hand arithmetic, sklearn / torch oracles and statistical invariants."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.calibration import calibration_curve

from first_kd import metrics as M


def _random_probs(rng, n, c, sharpness=3.0):
    logits = rng.normal(size=(n, c)) * sharpness
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- hand-computed


def test_ece_mce_hand_computed():
    # 10 uniform bins, (lo, hi]:
    #   0.15, 0.15         -> bin (0.1, 0.2]: conf 0.15, correct 0, 1 -> acc 0.5, gap 0.35
    #   0.65, 0.75         -> bins (0.6, 0.7] and (0.7, 0.8]: one sample each
    #        0.65 correct  -> gap |1 - 0.65| = 0.35;  0.75 wrong -> gap 0.75
    #   0.95, 0.95, 0.95, 1.0 -> bin (0.9, 1.0]: conf (0.95*3 + 1)/4 = 0.9625, correct 1,1,1,0 -> acc 0.75
    #                            gap 0.2125
    # ECE = (2*0.35 + 1*0.35 + 1*0.75 + 4*0.2125) / 8 = (0.7 + 0.35 + 0.75 + 0.85) / 8 = 2.65 / 8
    conf = [0.15, 0.15, 0.65, 0.75, 0.95, 0.95, 0.95, 1.0]
    corr = [0, 1, 1, 0, 1, 1, 1, 0]
    assert M.expected_calibration_error(conf, corr) == pytest.approx(2.65 / 8, abs=1e-12)
    assert M.maximum_calibration_error(conf, corr) == pytest.approx(0.75, abs=1e-12)

    bins = M.calibration_bins(conf, corr)
    np.testing.assert_array_equal(bins["count"], [0, 2, 0, 0, 0, 0, 1, 1, 0, 4])
    np.testing.assert_allclose(bins["lower"], np.arange(10) / 10, atol=1e-15)
    np.testing.assert_allclose(bins["upper"], np.arange(1, 11) / 10, atol=1e-15)
    assert bins["accuracy"][1] == 0.5 and bins["accuracy"][9] == 0.75
    assert bins["mean_confidence"][9] == pytest.approx(0.9625)
    empty = bins["count"] == 0
    assert np.isnan(bins["accuracy"][empty]).all() and np.isnan(bins["mean_confidence"][empty]).all()


def test_brier_nll_accuracy_hand_computed():
    # row 0: p = (0.7, 0.2, 0.1), label 0: Brier (0.3^2 + 0.2^2 + 0.1^2) = 0.14, -log 0.7, correct
    # row 1: p = (0.5, 0.5, 0.0), label 2: Brier (0.25 + 0.25 + 1) = 1.5, -log(1e-12) (clamped), wrong
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    labels = np.array([0, 2])
    assert M.brier_score(probs, labels) == pytest.approx((0.14 + 1.5) / 2)
    assert M.negative_log_likelihood(probs, labels) == pytest.approx((-math.log(0.7) - math.log(1e-12)) / 2)
    assert M.accuracy(probs, labels) == 0.5
    assert M.mean_confidence(probs) == pytest.approx(0.6)
    # top-label Brier: (0.7 - 1)^2 = 0.09, (0.5 - 0)^2 = 0.25
    assert M.top_label_brier_score([0.7, 0.5], [1, 0]) == pytest.approx(0.17)
    assert M.gold_negative_log_likelihood([0.7, 1.0]) == pytest.approx(-math.log(0.7) / 2)


def test_argmax_ties_take_first_index():
    stats = M.top_label_statistics(np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 1]))
    np.testing.assert_array_equal(stats["correct"], [1.0, 0.0])


def test_overconfident_model_has_ece_point_three():
    # Always 0.9 confident, right on exactly 60%: one bin, |0.6 - 0.9| = 0.3.
    conf = np.full(1000, 0.9)
    corr = np.zeros(1000)
    corr[:600] = 1
    for strategy in M.STRATEGIES:
        assert M.expected_calibration_error(conf, corr, strategy=strategy) == pytest.approx(0.3, abs=1e-12)
        assert M.maximum_calibration_error(conf, corr, strategy=strategy) == pytest.approx(0.3, abs=1e-12)


def test_confidence_zero_and_one_land_in_first_and_last_bin():
    for n_bins in (1, 3, 10, 15):
        bins = M.calibration_bins([0.0, 1.0, 1.0], [0, 1, 1], n_bins=n_bins)
        assert len(bins["count"]) == n_bins
        if n_bins == 1:
            assert bins["count"][0] == 3
        else:
            assert bins["count"][0] == 1 and bins["count"][-1] == 2 and bins["count"].sum() == 3
    # a perfect model (always 1.0 and right, or 0.0 and wrong) is perfectly calibrated
    assert M.expected_calibration_error([1.0, 0.0, 1.0], [1, 0, 1]) == 0.0


def test_bins_are_left_open_right_closed():
    # Exactly on an interior edge goes to the lower bin. 0.5 is exact in binary, and in linspace.
    bins = M.calibration_bins([0.5, 0.5000001], [1, 1], n_bins=2)
    np.testing.assert_array_equal(bins["count"], [1, 1])


# ---------------------------------------------------------------------------------- sklearn oracle


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [5, 7, 10])
def test_bins_match_sklearn_calibration_curve(strategy, n_bins):
    # sklearn bins with np.searchsorted(edges[1:-1], p) (side="left"): the same (lo, hi] convention
    # as ours, with the same uniform linspace edges. Its quantile edges come from np.percentile,
    # ours from np.quantile, which can differ in the last ulp. With 1000 distinct continuous samples
    # the i-th quantile sits at sorted position 999 * i / n_bins, never an integer for 0 < i < n_bins
    # when n_bins is 5, 7 or 10 (999 = 3^3 * 37), so every interior edge lies strictly between two
    # samples, no sample sits on an edge and the two agree exactly. sklearn drops empty bins; we
    # compare the non-empty ones.
    rng = np.random.default_rng(n_bins)
    conf = rng.beta(5, 2, size=1000)
    corr = (rng.random(1000) < conf**1.5).astype(float)
    prob_true, prob_pred = calibration_curve(corr, conf, n_bins=n_bins, strategy=strategy)
    bins = M.calibration_bins(conf, corr, n_bins=n_bins, strategy=strategy)
    nonempty = bins["count"] > 0
    np.testing.assert_allclose(bins["accuracy"][nonempty], prob_true, rtol=0, atol=1e-12)
    np.testing.assert_allclose(bins["mean_confidence"][nonempty], prob_pred, rtol=0, atol=1e-12)
    assert bins["count"].sum() == 1000
    if strategy == "quantile":
        assert bins["count"].max() - bins["count"].min() <= 1  # equal mass, up to rounding


def test_quantile_bins_have_equal_mass_and_ties_leave_empty_bins():
    rng = np.random.default_rng(0)
    bins = M.calibration_bins(rng.random(1000), rng.random(1000) < 0.5, n_bins=8, strategy="quantile")
    np.testing.assert_array_equal(bins["count"], np.full(8, 125))
    assert bins["lower"][0] == 0.0 and bins["upper"][-1] == 1.0
    np.testing.assert_array_equal(bins["lower"][1:], bins["upper"][:-1])
    # all-equal confidences: every edge ties, all samples fall in the first bin whose upper edge
    # reaches them, the zero-width bins stay empty, and ECE is unaffected
    tied = M.calibration_bins(np.full(50, 0.7), np.arange(50) < 35, n_bins=5, strategy="quantile")
    assert tied["count"].sum() == 50 and (tied["count"] > 0).sum() == 1
    assert M.expected_calibration_error(np.full(50, 0.7), np.arange(50) < 35, 5, "quantile") == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------- statistics


def test_perfectly_calibrated_model_has_small_ece():
    # correct ~ Bernoulli(conf). Given the confidences, in bin b the gap acc_b - conf_b is a mean of
    # n_b independent zero-mean variables in [-1, 1] shifted... precisely (1/n_b) sum (y_i - p_i)
    # with y_i - p_i in [-p_i, 1 - p_i], an interval of length 1. Hoeffding: P(|gap_b| > t_b) <=
    # 2 exp(-2 n_b t_b^2). Union over B bins with total failure probability delta:
    # t_b = sqrt(log(2B/delta) / (2 n_b)), so ECE <= sum_b (n_b/N) t_b with probability >= 1 - delta.
    n, n_bins, delta = 20_000, 10, 1e-6
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.05, 1.0, size=n)
    corr = rng.random(n) < conf
    bins = M.calibration_bins(conf, corr, n_bins)
    nb = bins["count"][bins["count"] > 0].astype(float)
    bound = float(np.sum(nb / n * np.sqrt(math.log(2 * n_bins / delta) / (2 * nb))))
    ece = M.expected_calibration_error(conf, corr, n_bins)
    assert ece <= bound, (ece, bound)
    # and the metric is not blind: the same outcomes reported 0.1 more confident show ECE ~ 0.1
    shifted = np.clip(conf + 0.1, 0, 1)
    assert M.expected_calibration_error(shifted, corr, n_bins) > 0.1 - bound
    # adaptive ECE obeys the same bound (equal-mass bins, still fixed given the confidences)
    assert M.expected_calibration_error(conf, corr, n_bins, "quantile") <= bound


def test_order_invariance():
    rng = np.random.default_rng(2)
    probs = _random_probs(rng, 500, 7)
    labels = rng.integers(0, 7, size=500)
    perm = rng.permutation(500)
    for strategy in M.STRATEGIES:
        a = M.calibration_summary(probs, labels, 10, strategy)
        b = M.calibration_summary(probs[perm], labels[perm], 10, strategy)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12), k


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_accumulator_over_random_batches_equals_one_call(strategy):
    rng = np.random.default_rng(3)
    n, c = 1000, 11
    probs = _random_probs(rng, n, c)
    labels = rng.integers(0, c, size=n)
    whole = M.calibration_summary(probs, labels, n_bins=12, strategy=strategy)
    stats = M.top_label_statistics(probs, labels)
    whole_bins = M.calibration_bins(stats["confidence"], stats["correct"], 12, strategy)

    for trial in range(3):
        cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(1, 20), replace=False))
        acc = M.CalibrationAccumulator(n_bins=12, strategy=strategy)
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
            # mix numpy and torch inputs across batches
            if trial == 1:
                acc.update(torch.tensor(probs[lo:hi]), torch.tensor(labels[lo:hi]))
            else:
                acc.update(probs[lo:hi], labels[lo:hi])
        got = acc.compute()
        assert list(got) == list(M.SUMMARY_KEYS) == list(whole)
        for k in whole:
            assert got[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-12), k
        bins = acc.bins()
        for k in M.BIN_KEYS:
            np.testing.assert_allclose(bins[k], whole_bins[k], rtol=1e-12, atol=1e-12, equal_nan=True)


def test_accumulator_confidence_form():
    rng = np.random.default_rng(4)
    probs = _random_probs(rng, 300, 5)
    labels = rng.integers(0, 5, size=300)
    stats = M.top_label_statistics(probs, labels)
    whole = M.calibration_summary(probs, labels)

    acc = M.CalibrationAccumulator()
    acc.update_confidence(stats["confidence"][:100], stats["correct"][:100], stats["p_gold"][:100])
    acc.update_confidence(stats["confidence"][100:], stats["correct"][100:], stats["p_gold"][100:])
    got = acc.compute()
    assert got["brier"] is None  # the multi-class Brier needs the full vector
    for k in ("accuracy", "ece", "mce", "nll", "mean_confidence", "n", "n_bins"):
        assert got[k] == pytest.approx(whole[k], rel=1e-12), k

    acc.update_confidence([0.5], [1])  # no p_gold: NLL no longer defined over all samples
    assert acc.compute()["nll"] is None
    acc.reset()
    with pytest.raises(ValueError, match="empty"):
        acc.compute()


# ---------------------------------------------------------------------------------- oracles


def test_brier_matches_direct_numpy():
    rng = np.random.default_rng(5)
    probs = _random_probs(rng, 400, 9)
    labels = rng.integers(0, 9, size=400)
    onehot = np.eye(9)[labels]
    assert M.brier_score(probs, labels) == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, axis=1)), rel=1e-12)
    # top-label form from the same predictions
    conf, pred = probs.max(1), probs.argmax(1)
    assert M.top_label_brier_score(conf, pred == labels) == pytest.approx(np.mean((conf - (pred == labels)) ** 2))


def test_nll_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(300, 13, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 13, (300,), generator=g)
    probs = torch.softmax(logits, dim=-1)
    expected = F.cross_entropy(torch.log(probs), labels).item()
    assert M.negative_log_likelihood(probs, labels) == pytest.approx(expected, rel=1e-10)
    p_gold = probs.gather(1, labels[:, None])[:, 0]
    assert M.gold_negative_log_likelihood(p_gold) == pytest.approx(expected, rel=1e-10)


def test_torch_low_precision_and_chunking(monkeypatch):
    # bf16 probabilities and a chunk smaller than N exercise the reduction path a GPU eval uses.
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(100, 16, generator=g), -1)
    labels = torch.randint(0, 16, (100,), generator=g)
    ref = M.calibration_summary(probs.numpy().astype(np.float64), labels.numpy())
    got = M.calibration_summary(probs, labels)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k
    low = M.calibration_summary(probs.bfloat16(), labels)
    assert low["accuracy"] == pytest.approx(ref["accuracy"], abs=0.03)  # bf16 may flip near-ties


def test_summary_is_json_ready_and_bins_round_trip():
    rng = np.random.default_rng(8)
    probs = _random_probs(rng, 50, 4)
    labels = rng.integers(0, 4, size=50)
    summary = M.calibration_summary(probs, labels, n_bins=20)
    assert set(summary) == set(M.SUMMARY_KEYS) and summary["n"] == 50 and summary["n_bins"] == 20
    json.dumps(summary)
    stats = M.top_label_statistics(probs, labels)
    bins = M.calibration_bins(stats["confidence"], stats["correct"], 20)
    text = json.dumps(M.bins_to_json(bins), allow_nan=False)  # empty bins present -> None, not NaN
    back = M.bins_from_json(json.loads(text))
    for k in M.BIN_KEYS:
        np.testing.assert_array_equal(back[k], bins[k])
    assert M.ece_from_bins(back) == pytest.approx(summary["ece"])


# ---------------------------------------------------------------------------------- bad input


GOOD_CONF, GOOD_CORR = [0.2, 0.9], [0, 1]


@pytest.mark.parametrize(
    "conf, corr, kwargs, match",
    [
        ([0.2, float("nan")], GOOD_CORR, {}, "NaN"),
        ([0.2, float("inf")], GOOD_CORR, {}, "NaN or inf"),
        ([0.2, 1.5], GOOD_CORR, {}, r"\[0, 1\]"),
        ([-0.1, 0.5], GOOD_CORR, {}, r"\[0, 1\]"),
        (GOOD_CONF, [0, 1, 1], {}, "lengths differ"),
        ([], [], {}, "empty"),
        (GOOD_CONF, [0, 2], {}, "0/1"),
        (GOOD_CONF, GOOD_CORR, {"n_bins": 0}, "n_bins"),
        (GOOD_CONF, GOOD_CORR, {"n_bins": 2.5}, "n_bins"),
        (GOOD_CONF, GOOD_CORR, {"strategy": "kmeans"}, "strategy"),
        ([[0.2, 0.9]], GOOD_CORR, {}, "1-D"),
    ],
)
def test_bad_top_label_input_raises(conf, corr, kwargs, match):
    for fn in (M.expected_calibration_error, M.maximum_calibration_error, M.calibration_bins):
        with pytest.raises(ValueError, match=match):
            fn(conf, corr, **kwargs)
    if not kwargs:
        with pytest.raises(ValueError, match=match):
            M.top_label_brier_score(conf, corr)
        with pytest.raises(ValueError, match=match):
            M.CalibrationAccumulator().update_confidence(conf, corr)


GOOD_P = np.array([[0.6, 0.4], [0.3, 0.7]])


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.array([[0.6, 0.6], [0.3, 0.7]]), [0, 1], "sum to 1"),
        (np.array([[2.0, -1.0], [0.3, 0.7]]), [0, 1], r"\[0, 1\]"),
        (np.array([[np.nan, 0.4], [0.3, 0.7]]), [0, 1], "NaN"),
        (GOOD_P, [0, 1, 1], "lengths differ"),
        (GOOD_P, [0, 2], "labels must lie"),
        (GOOD_P, [-100, 1], "-100"),
        (GOOD_P, [0.0, 1.0], "integer"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
        (np.array([0.6, 0.4]), [0], r"\[N, C\]"),
        (np.array([[1, 0], [0, 1]]), [0, 1], "floating"),
    ],
)
def test_bad_multiclass_input_raises(probs, labels, match):
    for fn in (M.calibration_summary, M.brier_score, M.negative_log_likelihood, M.accuracy, M.top_label_statistics):
        with pytest.raises(ValueError, match=match):
            fn(probs, np.asarray(labels))
    with pytest.raises(ValueError, match=match):
        M.CalibrationAccumulator(strategy="quantile").update(probs, np.asarray(labels))


def test_bad_accumulator_and_p_gold_arguments():
    with pytest.raises(ValueError, match="n_bins"):
        M.CalibrationAccumulator(n_bins=0)
    with pytest.raises(ValueError, match="strategy"):
        M.CalibrationAccumulator(strategy="equal")
    with pytest.raises(ValueError, match="lengths differ"):
        M.CalibrationAccumulator().update_confidence(GOOD_CONF, GOOD_CORR, p_gold=[0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.gold_negative_log_likelihood([1.2])
    with pytest.raises(ValueError, match="no samples"):
        M.ece_from_bins({"count": np.zeros(3), "accuracy": np.full(3, np.nan), "mean_confidence": np.full(3, np.nan)})


def test_accumulated_per_sample_brier_is_their_mean_in_any_split():
    rng = np.random.default_rng(3)
    conf, correct = rng.uniform(0.2, 1.0, 50), (rng.uniform(size=50) < 0.6).astype(float)
    brier = rng.uniform(0, 2, 50)
    whole = M.CalibrationAccumulator()
    whole.update_confidence(conf, correct, brier=brier)
    parts = M.CalibrationAccumulator()
    for lo in range(0, 50, 7):
        parts.update_confidence(conf[lo:lo + 7], correct[lo:lo + 7], brier=brier[lo:lo + 7])
    assert whole.compute()["brier"] == pytest.approx(brier.mean()) == parts.compute()["brier"]
    without = M.CalibrationAccumulator()
    without.update_confidence(conf, correct)
    assert without.compute()["brier"] is None
