"""Variable-k (ragged) teacher rows: a batch padded to [N, k_max] (id -1 and log-prob -inf at padding columns,
teacher probability 0 there) gives every loss, gradient, target and calibration number exactly as the same
function on each row alone with its real columns only. Seeded, small, float64 where the math allows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from first_kd import calibration as C
from first_kd import metrics
from first_kd.losses import (
    StudentNorm,
    chunked_distillation_loss,
    chunked_sampled_kd_loss,
    distillation_loss,
    sample_weights,
    sampled_kd_loss,
    sampled_log_normaliser,
    sparse_kl,
    student_log_probs,
)
from first_kd.temperature import (
    other_mass_logprob,
    sampled_target_logprobs,
    smooth_top1,
    teacher_distribution,
    teacher_target,
)

F64 = torch.float64
N, V, K_MAX, H = 8, 13, 5, 6
TIGHT = dict(rtol=1e-10, atol=1e-12)
NORMS = {
    "logit": StudentNorm(),
    "prob-softmax": StudentNorm("prob-softmax", temperature=0.5),
    "linear": StudentNorm("linear", eps=1e-3),
}


def _ragged_topk(gen, n=N, v=V, k_max=K_MAX, dtype=F64):
    """Teacher top-count rows of a random full distribution, counts 1..k_max (both ends present), padded:
    (ids [n, k_max] with -1 at padding, log-probs [n, k_max] with -inf there, counts [n])."""
    counts = torch.randint(1, k_max + 1, (n,), generator=gen)
    counts[0], counts[1] = 1, k_max
    full = torch.log_softmax(2.0 * torch.randn(n, v, generator=gen, dtype=dtype), -1)
    order = full.argsort(-1, descending=True)
    ids = torch.full((n, k_max), -1, dtype=torch.long)
    lp = torch.full((n, k_max), float("-inf"), dtype=dtype)
    for r, c in enumerate(counts.tolist()):
        ids[r, :c] = order[r, :c]
        lp[r, :c] = full[r, order[r, :c]]
    return ids, lp, counts


def _probs(lp, bucket):
    """Float64 teacher probabilities of padded log-probs: renormalised (0 at padding), rest last with the bucket."""
    p = torch.softmax(lp, -1)
    if not bucket:
        return p
    rest = 1.0 - lp.exp().sum(-1, keepdim=True)
    return torch.cat([p * (1.0 - rest), rest], -1)


def _row(ids, probs, r, c, bucket):
    """Row r alone with its c real columns (the bucket column kept last)."""
    p = probs[r:r + 1, :c]
    if bucket:
        p = torch.cat([p, probs[r:r + 1, -1:]], -1)
    return ids[r:r + 1, :c], p


def _loss_case(seed, bucket):
    gen = torch.Generator().manual_seed(seed)
    ids, lp, counts = _ragged_topk(gen)
    probs = _probs(lp, bucket)
    targets = torch.randint(0, V, (N,), generator=gen)
    mask = torch.ones(N, dtype=torch.bool)
    # An ignored row (target -100) and a masked one, both holding garbage.
    targets[2] = -100
    mask[3] = False
    for r in (2, 3):
        ids[r] = torch.tensor([V + 5, -7, 3, 3, -1])
        probs[r] = float("nan")
    return ids, probs, counts, targets, mask


def _counted(targets, mask):
    return [r for r in range(N) if targets[r] != -100 and bool(mask[r])]


def _per_row_total(logits, ids, probs, counts, targets, mask, bucket, alpha, norm, reduction):
    """Sum (or mean) over counted rows of the loss on each row alone, unpadded: the oracle."""
    rows = _counted(targets, mask)
    total = 0.0
    for r in rows:
        i, p = _row(ids, probs, r, int(counts[r]), bucket)
        total = total + distillation_loss(logits[r:r + 1], targets[r:r + 1], i, p, alpha=alpha, other_bucket=bucket,
                                          label_smoothing=0.1, reduction="sum", student_norm=norm)
    return total / len(rows) if reduction == "mean" else total


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_distillation_loss_on_padded_rows_equals_each_row_alone(bucket, alpha, norm, reduction):
    ids, probs, counts, targets, mask = _loss_case(0, bucket)
    logits = (3.0 * torch.randn(N, V, generator=torch.Generator().manual_seed(1), dtype=F64)).requires_grad_(True)
    got = distillation_loss(logits, targets, ids, probs, alpha=alpha, other_bucket=bucket, label_smoothing=0.1,
                            reduction=reduction, mask=mask, student_norm=NORMS[norm])
    want = _per_row_total(logits, ids, probs, counts, targets, mask, bucket, alpha, NORMS[norm], reduction)
    torch.testing.assert_close(got, want, **TIGHT)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    assert torch.isfinite(g_got).all()
    torch.testing.assert_close(g_got, g_want, **TIGHT)


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("norm", list(NORMS))
def test_per_row_losses_and_sparse_kl_on_padded_rows(bucket, norm):
    ids, probs, counts, targets, mask = _loss_case(2, bucket)
    logits = 3.0 * torch.randn(N, V, generator=torch.Generator().manual_seed(3), dtype=F64)
    per_row = sparse_kl(logits, ids, probs, other_bucket=bucket, reduction="none",
                        mask=mask & (targets != -100), student_norm=NORMS[norm])
    for r in range(N):
        if r not in _counted(targets, mask):
            assert float(per_row[r]) == 0.0
            continue
        i, p = _row(ids, probs, r, int(counts[r]), bucket)
        alone = sparse_kl(logits[r:r + 1], i, p, other_bucket=bucket, reduction="sum", student_norm=NORMS[norm])
        torch.testing.assert_close(per_row[r], alone, **TIGHT)


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("norm", list(NORMS))
def test_student_log_probs_ignore_padding_columns(bucket, norm):
    ids, _, counts, _, _ = _loss_case(4, bucket)
    ids[2:4] = ids[0:2]  # no garbage rows here: this function sees counted rows only
    counts[2:4] = counts[0:2]
    z = (3.0 * torch.randn(N, V, generator=torch.Generator().manual_seed(5), dtype=F64)).requires_grad_(True)
    logr = student_log_probs(z, ids, bucket, NORMS[norm])
    assert logr.shape == (N, K_MAX + (1 if bucket else 0))
    assert torch.isfinite(logr).all()
    for r, c in enumerate(counts.tolist()):
        alone = student_log_probs(z[r:r + 1], ids[r:r + 1, :c], bucket, NORMS[norm])[0]
        torch.testing.assert_close(logr[r, :c], alone[:c], **TIGHT)
        if bucket:
            torch.testing.assert_close(logr[r, -1], alone[-1], **TIGHT)
        assert bool((logr[r, c:K_MAX] == torch.finfo(F64).min).all())  # finite, and exp gives exactly 0
    # Padding columns carry no gradient at all.
    pad = torch.cat([ids < 0, torch.zeros(N, int(bucket), dtype=torch.bool)], 1)
    weights = torch.randn(logr.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    (g_pad,) = torch.autograd.grad(logr, z, grad_outputs=weights * pad)
    assert float(g_pad.abs().max()) == 0.0


def _chunked_oracle(hidden, weight, bias, ids, probs, counts, targets, mask, bucket, alpha, norm, reduction):
    logits = torch.addmm(bias, hidden, weight.t())
    return _per_row_total(logits, ids, probs, counts, targets, mask, bucket, alpha, norm, reduction)


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("chunk_size", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_on_padded_rows_equals_each_row_alone(bucket, alpha, norm, chunk_size, reduction):
    """Every chunked path: the sparse head at the ids (alpha 0, no bucket, logit), the closed-form dense chunk
    (with and without the bucket, CE mixed in), the autograd chunk (prob-softmax, linear)."""
    ids, probs, counts, targets, mask = _loss_case(7, bucket)
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(N, H, generator=gen, dtype=F64).requires_grad_(True)
    weight = torch.randn(V, H, generator=gen, dtype=F64).requires_grad_(True)
    bias = torch.randn(V, generator=gen, dtype=F64).requires_grad_(True)
    got = chunked_distillation_loss(hidden, weight, targets, ids, probs, alpha=alpha, other_bucket=bucket,
                                    label_smoothing=0.1, chunk_size=chunk_size, reduction=reduction, head_bias=bias,
                                    mask=mask, student_norm=NORMS[norm])
    want = _chunked_oracle(hidden, weight, bias, ids, probs, counts, targets, mask, bucket, alpha, NORMS[norm],
                           reduction)
    torch.testing.assert_close(got, want, **TIGHT)
    grads_got = torch.autograd.grad(got, (hidden, weight, bias))
    grads_want = torch.autograd.grad(want, (hidden, weight, bias))
    for a, b in zip(grads_got, grads_want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("norm", list(NORMS))
def test_fp32_padded_rows_are_nan_free_with_zero_padding_probs(bucket, alpha, norm):
    """fp32, large logits (tiny student probabilities at some ids): padding probs exactly 0 never give NaN."""
    ids, probs, counts, targets, mask = _loss_case(9, bucket)
    probs = probs.float()
    gen = torch.Generator().manual_seed(10)
    logits = (30.0 * torch.randn(N, V, generator=gen)).requires_grad_(True)
    loss = distillation_loss(logits, targets, ids, probs, alpha=alpha, other_bucket=bucket, mask=mask,
                             student_norm=NORMS[norm])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    hidden = (5.0 * torch.randn(N, H, generator=gen)).requires_grad_(True)
    weight = (5.0 * torch.randn(V, H, generator=gen)).requires_grad_(True)
    chunked = chunked_distillation_loss(hidden, weight, targets, ids, probs, alpha=alpha, other_bucket=bucket,
                                        chunk_size=3, mask=mask, student_norm=NORMS[norm])
    chunked.backward()
    assert torch.isfinite(chunked) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_all_real_columns_plus_padding_is_still_the_dense_kl():
    """k = V real columns, padded to V + 2: the dense KL, with or without the (empty) bucket, finite gradients."""
    gen = torch.Generator().manual_seed(11)
    n, v = 5, 7
    student = (2.0 * torch.randn(n, v, generator=gen, dtype=F64)).requires_grad_(True)
    teacher = torch.softmax(2.0 * torch.randn(n, v, generator=gen, dtype=F64), -1)
    oracle = F.kl_div(torch.log_softmax(student, -1), teacher, reduction="batchmean")
    ids = torch.cat([torch.stack([torch.randperm(v, generator=gen) for _ in range(n)]),
                     torch.full((n, 2), -1)], 1)
    p = torch.cat([teacher.gather(1, ids[:, :v]), torch.zeros(n, 2, dtype=F64)], 1)
    torch.testing.assert_close(sparse_kl(student, ids, p), oracle, **TIGHT)
    with_rest = torch.cat([p, torch.zeros(n, 1, dtype=F64)], 1)
    got = sparse_kl(student, ids, with_rest, other_bucket=True)
    torch.testing.assert_close(got, oracle, **TIGHT)
    got.backward()
    assert torch.isfinite(student.grad).all()


def test_check_ids_ignores_padding_but_rejects_bad_real_ids():
    z = torch.randn(2, 6, dtype=F64)
    p = torch.tensor([[0.7, 0.3, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64)
    ok = torch.tensor([[4, 1, -1, -1], [2, -1, -1, -1]])  # repeated -1 padding is not a repeated id
    assert torch.isfinite(sparse_kl(z, ok, p))
    for bad, match in [
        (torch.tensor([[4, 4, -1, -1], [2, -1, -1, -1]]), "repeat"),
        (torch.tensor([[4, 6, -1, -1], [2, -1, -1, -1]]), "out of range"),
        (torch.tensor([[4, 1, -1, -1], [-1, -1, -1, -1]]), "column 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            sparse_kl(z, bad, p)
        with pytest.raises(ValueError, match=match):
            chunked_distillation_loss(torch.randn(2, 3, dtype=F64), torch.randn(6, 3, dtype=F64), None, bad, p)
    with pytest.raises(ValueError, match="0 at padding"):
        sparse_kl(z, ok, torch.tensor([[0.6, 0.3, 0.1, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64))
    # A masked row may still hold anything.
    garbage = torch.tensor([[4, 1, -1, -1], [-3, 99, 99, 7]])
    assert torch.isfinite(sparse_kl(z, garbage, p, mask=torch.tensor([True, False])))


# ---------------------------------------------------------------------------------------------------
# Teacher targets
# ---------------------------------------------------------------------------------------------------

RECORDS = [None, {"form": "logit", "value": 1.7}, {"form": "prob", "value": 0.4}]
FORM_OF_NORM = {"logit": "logit", "prob-softmax": "prob"}
# Every norm with every record it accepts (a forced form needs no record or a record of that form).
TARGET_CASES = [(norm, rec) for norm in ("auto", "logit", "prob-softmax", "linear") for rec in RECORDS
                if norm not in FORM_OF_NORM or rec is None or rec["form"] == FORM_OF_NORM[norm]]


@pytest.mark.parametrize("norm,record", TARGET_CASES)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("bucket", [False, True])
def test_teacher_target_on_padded_rows_equals_each_row_alone(norm, record, smoothing, bucket):
    ids, lp, counts = _ragged_topk(torch.Generator().manual_seed(12), dtype=torch.float32)
    got = teacher_target(lp, record, other_bucket=bucket, norm=norm, eps=1e-3, smoothing=smoothing)
    assert got.shape == (N, K_MAX + int(bucket))
    torch.testing.assert_close(got.sum(-1), torch.ones(N), rtol=0, atol=1e-6)
    for r, c in enumerate(counts.tolist()):
        alone = teacher_target(lp[r:r + 1, :c], record, other_bucket=bucket, norm=norm, eps=1e-3,
                               smoothing=smoothing)[0]
        torch.testing.assert_close(got[r, :c], alone[:c], rtol=1e-6, atol=1e-7)
        assert bool((got[r, c:K_MAX] == 0).all())
        if bucket:
            torch.testing.assert_close(got[r, -1], alone[-1], rtol=1e-6, atol=1e-7)
        if c == 1 and not bucket:
            assert float(got[r, 0]) == 1.0  # one real column: smoothing has nowhere to go


@pytest.mark.parametrize("form,value", [(None, 1.0), ("logit", 0.6), ("prob", 0.3)])
@pytest.mark.parametrize("bucket", [False, True])
def test_teacher_distribution_and_rest_mass_on_padded_rows(form, value, bucket):
    ids, lp, counts = _ragged_topk(torch.Generator().manual_seed(13), dtype=torch.float32)
    got = teacher_distribution(lp, form, value, other_bucket=bucket)
    rest = other_mass_logprob(lp)
    for r, c in enumerate(counts.tolist()):
        alone = teacher_distribution(lp[r:r + 1, :c], form, value, other_bucket=bucket)[0]
        torch.testing.assert_close(got[r, :c], alone[:c], rtol=1e-6, atol=1e-7)
        assert bool((got[r, c:K_MAX] == 0).all())
        if bucket:
            torch.testing.assert_close(got[r, -1], alone[-1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(rest[r], other_mass_logprob(lp[r, :c]), rtol=1e-6, atol=1e-7)


def test_smooth_top1_spreads_over_the_real_columns_only():
    probs = torch.tensor([[0.1, 0.7, 0.2, 0.0], [0.6, 0.4, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=F64)
    pad = torch.tensor([[False, False, False, True], [False, False, True, True], [False, True, True, True]])
    got = smooth_top1(probs, 0.2, pad)
    for r, c in enumerate([3, 2, 1]):
        torch.testing.assert_close(got[r, :c], smooth_top1(probs[r:r + 1, :c], 0.2)[0], **TIGHT)
    assert bool((got[pad] == 0).all())
    torch.testing.assert_close(got[2], probs[2], rtol=0, atol=0)
    # No padding: the same as without the mask.
    torch.testing.assert_close(smooth_top1(probs[:1, :3], 0.2, pad[:1, :3]), smooth_top1(probs[:1, :3], 0.2),
                               **TIGHT)


def test_sampled_target_logprobs_never_hit_a_padding_id():
    gen = torch.Generator().manual_seed(14)
    ids, lp, counts = _ragged_topk(gen, dtype=F64)
    full = torch.log_softmax(torch.randn(N, V, generator=gen, dtype=F64), -1)
    m = 6
    sample_ids = torch.randint(0, V, (N, m), generator=gen)
    sample_ids[:, -2:] = -1  # sample padding slots holding the same -1 as the top-k padding
    sample_ids[:, 0] = ids[:, 0]  # and a sure hit per row
    sample_lp = full.gather(1, sample_ids.clamp(min=0))
    target = teacher_target(lp, {"form": "prob", "value": 0.5}, other_bucket=True)
    got = sampled_target_logprobs(sample_ids, sample_lp, ids, lp, target)
    for r, c in enumerate(counts.tolist()):
        tgt = torch.cat([target[r:r + 1, :c], target[r:r + 1, -1:]], 1)
        alone = sampled_target_logprobs(sample_ids[r:r + 1], sample_lp[r:r + 1], ids[r:r + 1, :c], lp[r:r + 1, :c],
                                        tgt)[0]
        torch.testing.assert_close(got[r], alone, **TIGHT)
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------------------------------------------
# Sampled losses: padding slots with id -1, count 0 and any log-prob
# ---------------------------------------------------------------------------------------------------


def _sampled_case(seed):
    gen = torch.Generator().manual_seed(seed)
    m = 6
    ids = torch.randint(0, V, (N, m), generator=gen)
    counts = torch.randint(1, 4, (N, m), generator=gen)
    lt = torch.log_softmax(torch.randn(N, V, generator=gen, dtype=F64), -1).gather(1, ids)
    lq = torch.log_softmax(torch.randn(N, V, generator=gen, dtype=F64), -1).gather(1, ids)
    pad = torch.rand(N, m, generator=gen) < 0.4
    pad[:, 0] = False
    fills = [(float("-inf"), float("-inf")), (0.0, 0.0), (float("-inf"), 0.0), (0.0, float("-inf"))]
    for j, (a, b) in enumerate(itertools.islice(itertools.cycle(fills), int(pad.sum()))):
        r, c = pad.nonzero()[j].tolist()
        lt[r, c], lq[r, c] = a, b
    return ids.masked_fill(pad, -1), counts.masked_fill(pad, 0), lt, lq, pad


@pytest.mark.parametrize("objective", ["kl", "ce"])
@pytest.mark.parametrize("estimator", ["unbiased", "self-normalised"])
@pytest.mark.parametrize("chunked", [False, True])
def test_sampled_losses_with_minus_one_padding_equal_each_row_alone(objective, estimator, chunked):
    ids, counts, lt, lq, pad = _sampled_case(15)
    gen = torch.Generator().manual_seed(16)
    hidden = torch.randn(N, H, generator=gen, dtype=F64).requires_grad_(True)
    weight = torch.randn(V, H, generator=gen, dtype=F64).requires_grad_(True)

    def loss(rows, i, c, a, b):
        if chunked:
            return chunked_sampled_kd_loss(hidden[rows], weight, i, c, a, b, objective, estimator, chunk_size=3,
                                           reduction="sum")
        return sampled_kd_loss(hidden[rows] @ weight.t(), i, c, a, b, objective, estimator, reduction="sum")

    got = loss(slice(None), ids, counts, lt, lq)
    want = sum(loss(slice(r, r + 1), *(t[r:r + 1, ~pad[r]] for t in (ids, counts, lt, lq))) for r in range(N))
    torch.testing.assert_close(got, want, **TIGHT)
    grads_got = torch.autograd.grad(got, (hidden, weight))
    grads_want = torch.autograd.grad(want, (hidden, weight))
    for a, b in zip(grads_got, grads_want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TIGHT)


def test_sample_weights_and_normaliser_give_padding_nothing():
    ids, counts, lt, lq, pad = _sampled_case(17)
    for estimator in ("unbiased", "self-normalised"):
        w = sample_weights(counts, lt, lq, estimator)
        assert torch.isfinite(w).all() and bool((w[pad] == 0).all())
        for r in range(N):
            alone = sample_weights(counts[r:r + 1, ~pad[r]], lt[r:r + 1, ~pad[r]], lq[r:r + 1, ~pad[r]], estimator)
            torch.testing.assert_close(w[r, ~pad[r]], alone[0], **TIGHT)
    log_z = sampled_log_normaliser(counts, lt, lq)
    for r in range(N):
        alone = sampled_log_normaliser(counts[r:r + 1, ~pad[r]], lt[r:r + 1, ~pad[r]], lq[r:r + 1, ~pad[r]])
        torch.testing.assert_close(log_z[r], alone[0], **TIGHT)


# ---------------------------------------------------------------------------------------------------
# Calibration on padded rows
# ---------------------------------------------------------------------------------------------------


def test_calibration_on_padded_rows_equals_each_row_alone():
    gen = torch.Generator().manual_seed(18)
    n = 40
    ids, lp, counts = _ragged_topk(gen, n=n, v=20, k_max=6, dtype=torch.float32)
    targets = torch.where(torch.rand(n, generator=gen) < 0.7, ids[:, 0], torch.randint(0, 20, (n,), generator=gen))
    ranks = C.target_rank(ids.numpy(), targets.numpy())
    for r, c in enumerate(counts.tolist()):
        assert ranks[r] == C.target_rank(ids[r:r + 1, :c].numpy(), targets[r:r + 1].numpy())[0]
    assert C.target_rank(np.array([[3, -1, -1]]), np.array([-1]))[0] == -1  # -1 never matches padding
    inside = ranks >= 0
    for form, value in [(None, 1.0), ("logit", 1.8), ("prob", 0.4)]:
        stats = C.top_label(lp, ranks, form, value)
        per_row = [C.top_label(lp[r:r + 1, :c], ranks[r:r + 1], form, value) for r, c in enumerate(counts.tolist())]
        for key in ("confidence", "correct", "p_target"):
            np.testing.assert_allclose(stats[key], np.concatenate([s[key] for s in per_row]), rtol=1e-6, atol=1e-7)
        nll = C.conditional_nll(lp, ranks, form, value)
        alone = [C.conditional_nll(lp[r:r + 1, :c], ranks[r:r + 1], form, value)
                 for r, c in enumerate(counts.tolist()) if inside[r]]
        np.testing.assert_allclose(nll, np.mean(alone), rtol=1e-6)
        ece = metrics.expected_calibration_error(np.clip(np.concatenate([s["confidence"] for s in per_row]), 0, 1),
                                                 np.concatenate([s["correct"] for s in per_row]), 10)
        np.testing.assert_allclose(C.top_label_ece(lp, ranks, form, value), ece, rtol=1e-6, atol=1e-9)
    for form in ("prob", "logit"):
        fit = C.fit_temperature(lp, ranks, form)
        assert np.isfinite(fit.score) and np.isfinite(fit.value) and fit.value > 0
