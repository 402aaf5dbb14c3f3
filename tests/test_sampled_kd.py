"""Sampled caches (RS-KD): the sampler, the importance-weighted CE / KL and the targets of a sampled cache,
each against an exact value computed from the full distributions.

Monte Carlo checks draw D = 20,000 caches per row with fixed generators, compute in float64, and accept
|mean - exact| < 4 standard errors, the standard error measured from the draws themselves (and itself
checked to be small, so a loose tolerance cannot hide a wrong mean). Exact expectations (of the
self-normalised estimator's bias, of the unbiased one, of the normaliser estimate) come from enumerating
every multinomial outcome of n draws, weighted by its probability.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch

from first_kd.engines.sampling import compact_draws, sample_rows
from first_kd.losses import chunked_sampled_kd_loss, sample_weights, sampled_kd_loss, sampled_log_normaliser
from first_kd.temperature import (
    full_log_normaliser,
    full_tempered_logprobs,
    sampled_target_logprobs,
    teacher_target,
)

V, R, D, N_DRAWS = 12, 5, 20_000, 8
K = 3  # the top-k of the bucket targets


def _problem(seed: int = 0):
    """Teacher and student logits [R, V], float64."""
    g = torch.Generator().manual_seed(seed)
    teacher = 2.0 * torch.randn(R, V, generator=g, dtype=torch.float64)
    student = 1.5 * torch.randn(R, V, generator=g, dtype=torch.float64)
    return teacher, student


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _bucket_oracle(teacher: np.ndarray, form: str, value: float) -> np.ndarray:
    """The bucket target over the whole vocabulary, written from its definition: the tempered top-K
    at the top-K's own mass, every other id at the teacher's own probability. [R, V] float64."""
    p = _softmax(teacher)
    out = p.copy()
    for r in range(p.shape[0]):
        top = np.argsort(-p[r])[:K]
        pk = p[r, top]
        tempered = _softmax(np.log(pk) / value) if form == "logit" else _softmax(pk / value)
        out[r, top] = pk.sum() * tempered
    return out


# Targets: name -> (exact full distribution [R, V] from the teacher logits, per-id log-probs of a cache).
def _exact_target(name: str, teacher: torch.Tensor) -> np.ndarray:
    t = teacher.numpy()
    if name == "teacher":
        return _softmax(t)
    if name == "full-logit-1.6":
        return _softmax(t / 1.6)
    form, value = name.split("-")[1], float(name.split("-")[2])
    return _bucket_oracle(t, form, value)


def _cache_target_logprobs(name: str, teacher: torch.Tensor, rows, reps: int) -> torch.Tensor:
    """log p_t at each sampled id, as the library builds it (exact per id for every target here)."""
    if name == "teacher":
        return rows.logprobs
    full_lp = torch.log_softmax(teacher, -1).repeat(reps, 1)
    if name == "full-logit-1.6":
        return full_tempered_logprobs(rows.logprobs, 1.6, full_log_normaliser(full_lp, 1.6))
    form, value = name.split("-")[1], float(name.split("-")[2])
    topk_lp, topk_ids = full_lp.topk(K, dim=-1)
    target = teacher_target(topk_lp, {"form": form, "value": value}, other_bucket=True)
    return sampled_target_logprobs(rows.ids, rows.logprobs, topk_ids, topk_lp, target)


@functools.lru_cache(maxsize=None)
def _draws(tau: float, seed: int = 0):
    teacher, _ = _problem()
    return sample_rows(teacher.repeat(D, 1), N_DRAWS, torch.Generator().manual_seed(seed), tau)


def _mean_and_se(x: torch.Tensor):
    """Mean over the first axis and its standard error."""
    return x.mean(0), x.std(0) / math.sqrt(x.shape[0])


# ---------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------


def test_compact_draws_on_a_hand_example():
    ids, counts = compact_draws(torch.tensor([[3, 1, 3, 3], [0, 0, 0, 0], [2, 7, 5, 9]]))
    assert ids.tolist() == [[1, 3, 0, 0], [0, 0, 0, 0], [2, 5, 7, 9]]
    assert counts.tolist() == [[1, 3, 0, 0], [4, 0, 0, 0], [1, 1, 1, 1]]
    assert ids.dtype == torch.int64 and counts.dtype == torch.int32


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_sampled_rows_are_compact_exact_and_deterministic(tau):
    teacher, _ = _problem(1)
    logits = teacher.float().repeat(40, 1)
    rows = sample_rows(logits, 16, torch.Generator().manual_seed(5), tau)
    real = rows.counts > 0
    assert rows.ids.shape == rows.counts.shape == rows.logprobs.shape == (logits.shape[0], 16)
    assert (rows.counts.sum(1) == 16).all() and (rows.counts >= 0).all()
    # Distinct ids first, increasing; padding after them, id 0 and log-probs 0.
    n_real = real.sum(1, keepdim=True)
    assert torch.equal(real, torch.arange(16).unsqueeze(0) < n_real)
    assert ((rows.ids[:, 1:] > rows.ids[:, :-1]) | ~real[:, 1:]).all()
    assert (rows.ids[~real] == 0).all() and (rows.logprobs[~real] == 0).all()
    assert (rows.proposal_logprobs[~real] == 0).all()
    assert rows.logprobs.dtype == torch.float32
    want_p = torch.log_softmax(logits.double(), -1).gather(1, rows.ids)
    want_q = torch.log_softmax(logits.double() / tau, -1).gather(1, rows.ids)
    torch.testing.assert_close(rows.logprobs.double()[real], want_p[real], rtol=0, atol=2e-6)
    torch.testing.assert_close(rows.proposal_logprobs.double()[real], want_q[real], rtol=0, atol=2e-6)
    again = sample_rows(logits, 16, torch.Generator().manual_seed(5), tau)
    assert all(torch.equal(a, b) for a, b in zip(rows, again))
    other = sample_rows(logits, 16, torch.Generator().manual_seed(6), tau)
    assert not torch.equal(rows.counts, other.counts)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_sampled_frequencies_match_the_proposal(tau):
    """Each id's share of the D * n draws of a row is Binomial(D n, q) / (D n): within 4 SE of q, and a
    chi-square statistic per row below its 1e-4 critical value; against the teacher (tau != 1) it is not."""
    teacher, _ = _problem()
    rows = _draws(tau)
    counts = torch.zeros(D * R, V, dtype=torch.float64).scatter_add_(1, rows.ids, rows.counts.double())
    total = counts.view(D, R, V).sum(0)
    trials = D * N_DRAWS
    freq = total / trials
    q = torch.softmax(teacher / tau, -1)
    se = (q * (1 - q) / trials).sqrt()
    assert ((freq - q).abs() < 4 * se).all(), ((freq - q) / se).abs().max()
    chi2 = ((total - trials * q) ** 2 / (trials * q)).sum(1)
    assert (chi2 < 37.4).all(), chi2  # chi-square(11) exceeds 37.4 with probability 1e-4
    if tau != 1.0:  # the test can tell the proposal from the teacher
        p = torch.softmax(teacher, -1)
        assert ((freq - p).abs() / se).max() > 20


# ---------------------------------------------------------------------------------------------------
# The unbiased estimator: Monte Carlo mean == exact CE, KL and gradient
# ---------------------------------------------------------------------------------------------------

CASES = [  # (target, proposal temperature)
    ("teacher", 1.0),          # the paper's RS-KD: weights 1
    ("teacher", 0.7),          # a tempered proposal: weights p / q
    ("full-logit-1.6", 1.6),   # sampled at the calibrated temperature: weights 1 again
    ("full-logit-1.6", 1.0),   # full-vocabulary scaling with log Z_T recorded
    ("bucket-prob-0.4", 1.0),  # FIRST's prob form on the top-k, the tail kept: exact after the fact
    ("bucket-logit-2.5", 1.0),
    ("bucket-prob-0.4", 1.3),
]


# Monte Carlo on five of them (time); test_unbiased_by_enumeration_for_every_target_at_small_n covers all seven.
@pytest.mark.parametrize("target,tau", [CASES[i] for i in (0, 1, 2, 4, 6)])
def test_monte_carlo_mean_of_the_loss_is_the_exact_ce_and_kl(target, tau):
    teacher, student = _problem()
    rows = _draws(tau)
    lt = _cache_target_logprobs(target, teacher, rows, D).double()
    lq = rows.proposal_logprobs.double()
    p_t = torch.from_numpy(_exact_target(target, teacher))
    log_s = torch.log_softmax(student, -1)
    ce = -(p_t * log_s).sum(-1)
    entropy = -(p_t * p_t.log()).sum(-1)
    z = student.repeat(D, 1)

    def mc(objective, **kw):
        per_row = sampled_kd_loss(z, rows.ids, rows.counts, lt, lq, objective=objective, reduction="none", **kw)
        return _mean_and_se(per_row.view(D, R))

    for name, (mean, se), exact in [
        ("ce", mc("ce"), ce),
        ("kl, H estimated", mc("kl"), ce - entropy),
        ("kl, H supplied", mc("kl", target_entropy=entropy.repeat(D)), ce - entropy),
    ]:
        assert (se < 0.03).all(), (name, se)
        assert ((mean - exact).abs() < 4 * se).all(), (name, mean, exact, se)
    assert ((ce - entropy) > 0.05).all()  # the student is far from the target: the check means something


@pytest.mark.parametrize("target,tau", [CASES[0], CASES[1], CASES[4]])
def test_monte_carlo_mean_of_the_gradient_is_the_exact_gradient(target, tau):
    teacher, student = _problem()
    rows = _draws(tau)
    lt = _cache_target_logprobs(target, teacher, rows, D).double()
    z = student.repeat(D, 1).requires_grad_(True)
    sampled_kd_loss(z, rows.ids, rows.counts, lt, rows.proposal_logprobs.double(), reduction="sum").backward()
    mean, se = _mean_and_se(z.grad.view(D, R, V))
    p_t = torch.from_numpy(_exact_target(target, teacher))
    exact = torch.softmax(student, -1) - p_t  # the full-distillation gradient of CE / KL w.r.t. the logits
    assert (se < 0.01).all(), se.max()
    assert ((mean - exact).abs() < 4 * se + 1e-12).all(), ((mean - exact).abs() / se).max()


def test_with_the_target_as_proposal_every_weight_is_exactly_one():
    teacher, student = _problem()
    rows = sample_rows(teacher.repeat(50, 1), N_DRAWS, torch.Generator().manual_seed(3))
    n = rows.counts.sum(1, keepdim=True).double()
    assert torch.equal(rows.proposal_logprobs, rows.logprobs)  # proposal temperature 1 = the teacher
    assert torch.equal(sample_weights(rows.counts, rows.logprobs, rows.proposal_logprobs),
                       rows.counts.double() / n)
    z = student.repeat(50, 1)
    count_weighted_ce = (rows.counts / n * -torch.log_softmax(z, -1).gather(1, rows.ids)).sum(1)
    got = sampled_kd_loss(z, rows.ids, rows.counts, rows.logprobs, rows.proposal_logprobs, objective="ce",
                          reduction="none")
    torch.testing.assert_close(got, count_weighted_ce, rtol=1e-14, atol=0)
    # Sampled at the calibrated temperature (option c): the tempered target is the proposal, weights 1.
    t = 1.6
    hot = sample_rows(teacher.repeat(50, 1), N_DRAWS, torch.Generator().manual_seed(4), proposal_temperature=t)
    lt = full_tempered_logprobs(hot.logprobs, t, full_log_normaliser(torch.log_softmax(teacher, -1), t).repeat(50))
    w = sample_weights(hot.counts, lt, hot.proposal_logprobs)
    torch.testing.assert_close(w, hot.counts.double() / N_DRAWS, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# Exact expectations by enumeration: the self-normalised estimator's bias shrinks with n
# ---------------------------------------------------------------------------------------------------


def _outcomes(n: int, v: int, q: np.ndarray):
    """Every count vector of n draws over v ids [M, v] and its multinomial probability under q [M]."""
    bars = np.array(list(itertools.combinations(range(n + v - 1), v - 1))).reshape(-1, v - 1)  # stars and bars
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), n + v - 1)], axis=1)
    counts = np.diff(edges, axis=1) - 1
    lgamma = np.vectorize(math.lgamma)
    logpmf = math.lgamma(n + 1) - lgamma(counts + 1).sum(1) + (counts * np.log(q)).sum(1)
    return torch.from_numpy(counts), torch.from_numpy(np.exp(logpmf))


def _expectation(n: int, estimator: str, objective: str = "ce", exact_logz: bool = False):
    """E over all outcomes of n draws from the teacher (V = 4, one row) of the estimate for the full-vocabulary
    target p_T, T = 2: (expectation, exact value, E[Z^], Z, E[log Z^]).

    The teacher's rarest id has p = 0.028: the self-normalised bias is O(1/n) only once n is large against
    1 / p of the ids that carry the weight (with p = 3e-4 it still grows from n = 1 to 16)."""
    g = torch.Generator().manual_seed(11)
    teacher = torch.randn(4, generator=g, dtype=torch.float64)
    student = torch.randn(4, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(teacher, -1)
    counts, pmf = _outcomes(n, 4, lp.exp().numpy())
    assert abs(float(pmf.sum()) - 1) < 1e-12
    m = counts.shape[0]
    ids = torch.arange(4).repeat(m, 1)
    logz = full_log_normaliser(lp, 2.0)
    lt = (full_tempered_logprobs(lp, 2.0, logz) if exact_logz else lp / 2.0).repeat(m, 1)
    lq = lp.repeat(m, 1)
    est = sampled_kd_loss(student.repeat(m, 1), ids, counts, lt, lq, objective=objective, estimator=estimator,
                          reduction="none")
    p_t = torch.softmax(teacher / 2.0, -1)
    log_s = torch.log_softmax(student, -1)
    exact = -(p_t * log_s).sum() if objective == "ce" else (p_t * (p_t.log() - log_s)).sum()
    log_zhat = sampled_log_normaliser(counts, lp.repeat(m, 1) / 2.0, lq)
    return (float((pmf * est).sum()), float(exact), float((pmf * log_zhat.exp()).sum()), float(logz.exp()),
            float((pmf * log_zhat).sum()))


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_self_normalised_bias_shrinks_with_n_and_the_unbiased_one_has_none(objective):
    e4, exact, zhat4, z, logzhat4 = _expectation(4, "self-normalised", objective)
    e32, *_ = _expectation(32, "self-normalised", objective)
    e64, _, zhat64, _, _ = _expectation(64, "self-normalised", objective)
    bias4, bias32, bias64 = abs(e4 - exact), abs(e32 - exact), abs(e64 - exact)
    assert bias4 > 1e-2, bias4  # it is biased ...
    assert bias64 < bias4 / 8, (bias4, bias64)  # ... less with more draws (11.6x / 12.9x less at 16x) ...
    assert abs(64 * bias64 / (32 * bias32) - 1) < 0.1, (bias32, bias64)  # ... as c / n: n * bias settles
    # The normaliser estimate itself is exactly unbiased; its log is not (Jensen).
    assert abs(zhat4 - z) < 1e-12 and abs(zhat64 - z) < 1e-12
    assert logzhat4 < math.log(z) - 1e-4
    # With the exact per-id target (log Z_T known) the plain estimator is exactly unbiased at any n.
    for n in (1, 4, 64):
        e, exact_n, *_ = _expectation(n, "unbiased", objective, exact_logz=True)
        assert abs(e - exact_n) < 1e-12, (n, e, exact_n)


def test_unbiased_by_enumeration_for_every_target_at_small_n():
    """The MC tests above, exactly: V = 12, n = 3 (364 outcomes), every target and proposal in CASES."""
    teacher, student = _problem()
    for target, tau in CASES:
        for r in range(R):
            q = torch.softmax(teacher[r] / tau, -1)
            counts, pmf = _outcomes(3, V, q.numpy())
            m = counts.shape[0]

            class Rows:  # the compact form of each outcome, every id listed (count 0 = padding)
                ids = torch.arange(V).repeat(m, 1)
                logprobs = torch.log_softmax(teacher[r], -1).repeat(m, 1)

            lt = _cache_target_logprobs(target, teacher[r:r + 1], Rows, m).double()
            est = sampled_kd_loss(student[r].repeat(m, 1), Rows.ids, counts, lt, q.log().repeat(m, 1),
                                  objective="ce", reduction="none")
            p_t = torch.from_numpy(_exact_target(target, teacher))[r]
            exact = -(p_t * torch.log_softmax(student[r], -1)).sum()
            tol = 1e-6 if target.startswith("bucket") else 1e-12  # teacher_target works in fp32
            assert abs(float((pmf * est).sum()) - float(exact)) < tol, (target, tau, r)


# ---------------------------------------------------------------------------------------------------
# Targets of a sampled cache
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form,value", [("prob", 0.4), ("logit", 2.5), ("logit", 1.0)])
def test_bucket_target_logprobs_are_the_full_vocabulary_target_at_every_id(form, value):
    teacher, _ = _problem(2)
    full_lp = torch.log_softmax(teacher, -1)
    topk_lp, topk_ids = full_lp.topk(K, dim=-1)
    target = teacher_target(topk_lp, {"form": form, "value": value}, other_bucket=True)
    every_id = torch.arange(V).repeat(R, 1)
    got = sampled_target_logprobs(every_id, full_lp, topk_ids, topk_lp, target).double()
    want = np.log(_bucket_oracle(teacher.numpy(), form, value))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(torch.logsumexp(got, -1), torch.zeros(R, dtype=torch.float64), rtol=0, atol=2e-6)
    if form == "logit" and value == 1.0:  # no temperature: the target is the teacher itself
        torch.testing.assert_close(got, full_lp, rtol=0, atol=2e-6)


def test_full_tempered_logprobs_with_the_true_normaliser_are_the_tempered_softmax():
    teacher, _ = _problem(3)
    lp = torch.log_softmax(teacher, -1)
    for t in (0.5, 1.0, 1.7):
        got = full_tempered_logprobs(lp, t, full_log_normaliser(lp, t))
        torch.testing.assert_close(got, torch.log_softmax(teacher / t, -1), rtol=0, atol=1e-12)
    assert torch.equal(full_log_normaliser(lp.float(), 1.0).abs() < 1e-6, torch.ones(R, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        full_log_normaliser(lp, 0.0)


# ---------------------------------------------------------------------------------------------------
# Chunked == unchunked, ignored rows, misuse
# ---------------------------------------------------------------------------------------------------


def _chunk_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(21)
    n, hdim, v = 11, 6, 30
    hidden = torch.randn(n, hdim, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, hdim, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=dtype, requires_grad=True)
    rows = sample_rows(2 * torch.randn(n, v, generator=g), 10, g, proposal_temperature=0.8)
    lt = rows.logprobs / 1.3  # an unnormalised target: fine for both estimators' arithmetic here
    mask = torch.ones(n, dtype=torch.bool)
    mask[[2, 7]] = False
    return hidden, weight, bias, rows, lt, mask


@pytest.mark.parametrize("estimator", ["unbiased", "self-normalised"])
@pytest.mark.parametrize("objective", ["ce", "kl"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_equals_unchunked_value_and_gradients(estimator, objective, reduction):
    hidden, weight, bias, rows, lt, mask = _chunk_case()
    kw = dict(objective=objective, estimator=estimator, reduction=reduction, mask=mask)
    params = (hidden, weight, bias)
    want = sampled_kd_loss(hidden @ weight.t() + bias, rows.ids, rows.counts, lt, rows.proposal_logprobs, **kw)
    want_grads = torch.autograd.grad(want, params)
    for chunk_size in (1, 4, 11, 64):
        got = chunked_sampled_kd_loss(hidden, weight, rows.ids, rows.counts, lt, rows.proposal_logprobs,
                                      chunk_size=chunk_size, head_bias=bias, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, params), want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        got = chunked_sampled_kd_loss(hidden, weight, rows.ids, rows.counts, lt, rows.proposal_logprobs,
                                      chunk_size=3, head_bias=bias, **kw)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def test_chunked_gradcheck_and_fp32():
    g = torch.Generator().manual_seed(22)
    h, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in
               [(4, 3), (7, 3), (7,)])
    small = sample_rows(torch.randn(4, 7, generator=g), 5, g, proposal_temperature=1.4)
    assert torch.autograd.gradcheck(
        lambda *a: chunked_sampled_kd_loss(a[0], a[1], small.ids, small.counts, small.logprobs,
                                           small.proposal_logprobs, chunk_size=3, head_bias=a[2]),
        (h, w, b), eps=1e-6, atol=1e-7)
    hidden, weight, _, rows, lt, mask = _chunk_case()
    h32, w32 = hidden.detach().float().requires_grad_(True), weight.detach().float().requires_grad_(True)
    got = chunked_sampled_kd_loss(h32, w32, rows.ids, rows.counts, lt, rows.proposal_logprobs, chunk_size=4,
                                  mask=mask)
    want = sampled_kd_loss(h32 @ w32.t(), rows.ids, rows.counts, lt, rows.proposal_logprobs, mask=mask)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
def test_ignored_rows_contribute_nothing_even_when_they_hold_garbage(chunked):
    hidden, weight, _, rows, lt, mask = _chunk_case()
    ids, counts, lt_bad, lq_bad = rows.ids.clone(), rows.counts.clone(), lt.clone(), rows.proposal_logprobs.clone()
    ids[~mask] = -5
    counts[~mask] = 0  # no samples at all
    lt_bad[~mask] = float("nan")
    lq_bad[~mask] = float("nan")

    def loss(h, i, c, a, b, m):
        if chunked:
            return chunked_sampled_kd_loss(h, weight, i, c, a, b, chunk_size=4, mask=m)
        return sampled_kd_loss(h @ weight.t(), i, c, a, b, mask=m)

    got = loss(hidden, ids, counts, lt_bad, lq_bad, mask)
    (gh,) = torch.autograd.grad(got, [hidden])
    want = loss(hidden[mask], rows.ids[mask], rows.counts[mask], lt[mask], rows.proposal_logprobs[mask], None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(gh).all() and (gh[~mask] == 0).all() and (gh[mask] != 0).any()


def test_misuse_raises_clear_value_errors():
    z = torch.randn(2, 6)
    ids = torch.tensor([[0, 1, 0], [2, 3, 4]])
    counts = torch.tensor([[2, 1, 0], [1, 1, 1]])
    lp = torch.full((2, 3), -1.0)
    with pytest.raises(ValueError, match="no samples"):
        sampled_kd_loss(z, ids, torch.zeros_like(counts), lp, lp)
    with pytest.raises(ValueError, match="out of range"):
        sampled_kd_loss(z, ids + 4, counts, lp, lp)
    with pytest.raises(ValueError, match=">= 0"):
        sampled_kd_loss(z, ids, -counts, lp, lp)
    with pytest.raises(ValueError, match="do not match"):
        sampled_kd_loss(z, ids, counts, lp[:, :2], lp)
    with pytest.raises(ValueError, match="estimator"):
        sampled_kd_loss(z, ids, counts, lp, lp, estimator="snis")
    with pytest.raises(ValueError, match="objective"):
        sampled_kd_loss(z, ids, counts, lp, lp, objective="js")
    with pytest.raises(ValueError, match="integers"):
        sampled_kd_loss(z, ids.float(), counts, lp, lp)
    with pytest.raises(ValueError, match="reduction"):
        chunked_sampled_kd_loss(torch.randn(2, 3), torch.randn(6, 3), ids, counts, lp, lp, reduction="none")
    with pytest.raises(ValueError, match="n must be"):
        sample_rows(z, 0)
    with pytest.raises(ValueError, match="proposal_temperature"):
        sample_rows(z, 3, proposal_temperature=0.0)
    # Padding ids (count 0) may repeat and need not be distinct from real ids.
    assert math.isfinite(float(sampled_kd_loss(z, ids, counts, lp, lp)))
