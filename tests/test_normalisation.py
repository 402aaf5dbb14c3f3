"""Student- and teacher-side normalisations of the KL (FIRST's `--use_norm` choices), the other bucket's
mass under temperature, and the "Distill w/ LS" smoothing, each against an independent formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from first_kd.losses import StudentNorm, chunked_distillation_loss, distillation_loss
from first_kd.temperature import smooth_top1, teacher_distribution, teacher_target


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _oracle_student(z, ids, kind, temperature=1.0, eps=1e-6, bucket=False):
    """The student's distribution over the ids written from the formulas, in float64 numpy."""
    q = _softmax(z)  # full-vocabulary probabilities
    rows = []
    for r in range(z.shape[0]):
        qi = q[r, ids[r]]
        if kind == "logit" and not bucket:
            rows.append(_softmax(z[r, ids[r]]))
            continue
        entries = np.append(qi, 1.0 - qi.sum()) if bucket else qi
        if kind == "logit":
            rows.append(entries)
        elif kind == "prob-softmax":
            rows.append(_softmax(entries / temperature))
        else:
            rows.append((entries + eps) / (entries + eps).sum())
    return np.stack(rows)


def _oracle_kl(p, r):
    return float(np.mean([(pi * (np.log(np.where(pi > 0, pi, 1.0)) - np.log(ri))).sum() for pi, ri in zip(p, r)]))


def _problem(seed=0, n=6, vocab=40, k=5, bucket=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    p = torch.softmax(torch.randn(n, k + int(bucket), generator=g, dtype=torch.float64), dim=-1)
    return z, ids, p


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("norm", [StudentNorm("logit"), StudentNorm("prob-softmax", temperature=0.7),
                                  StudentNorm("prob-softmax", temperature=1.0), StudentNorm("linear", eps=1e-3)])
def test_student_normalisations_match_the_formula(norm, bucket):
    z, ids, p = _problem(bucket=bucket)
    got = distillation_loss(z, None, ids, p, other_bucket=bucket, student_norm=norm)
    r = _oracle_student(z.numpy(), ids.numpy(), norm.kind, norm.temperature, norm.eps, bucket)
    assert float(got) == pytest.approx(_oracle_kl(p.numpy(), r), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["prob-softmax", "linear"])
def test_chunked_equals_unchunked_for_the_probability_normalisations(kind, alpha):
    """Value and gradients (hidden, head weight) of the memory-efficient head equal plain autograd."""
    g = torch.Generator().manual_seed(1)
    n, hdim, vocab, k = 7, 6, 30, 4
    hidden = torch.randn(n, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    p = torch.softmax(torch.randn(n, k + 1, generator=g, dtype=torch.float64), dim=-1)
    targets = torch.randint(vocab, (n,), generator=g)
    norm = StudentNorm(kind, temperature=0.5, eps=1e-4)
    ref = distillation_loss(hidden @ weight.t(), targets, ids, p, alpha=alpha, other_bucket=True, student_norm=norm)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_distillation_loss(hidden, weight, targets, ids, p, alpha=alpha, other_bucket=True,
                                    chunk_size=3, student_norm=norm)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_student_norm_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown student normalisation"):
        StudentNorm("softmax")
    with pytest.raises(ValueError, match="temperature"):
        StudentNorm("prob-softmax", temperature=0.0)
    with pytest.raises(ValueError, match="eps"):
        StudentNorm("linear", eps=float("nan"))


def _logp(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


@pytest.mark.parametrize("record", [None, {"form": "prob", "value": 0.4}, {"form": "logit", "value": 2.5}])
def test_the_other_bucket_keeps_the_teachers_own_rest_mass_under_any_temperature(record):
    lp = _logp([[0.5, 0.2, 0.1], [0.9, 0.05, 0.01]])
    target = teacher_target(lp, record, other_bucket=True).double()
    rest = 1.0 - lp.exp().sum(-1)
    torch.testing.assert_close(target[:, -1], rest, rtol=1e-6, atol=1e-7)
    # ... and the top-k part is the tempered, renormalised top-k scaled to the top-k's own mass.
    tempered = teacher_distribution(lp, record and record["form"], record["value"] if record else 1.0).double()
    torch.testing.assert_close(target[:, :-1], tempered * (1 - rest)[:, None], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_teacher_normalisations_match_the_formula():
    p = np.array([[0.6, 0.25, 0.1], [0.4, 0.3, 0.2]])
    lp = torch.log(torch.tensor(p))
    eps = 1e-3
    linear = teacher_target(lp, None, norm="linear", eps=eps).numpy()
    np.testing.assert_allclose(linear, (p + eps) / (p + eps).sum(-1, keepdims=True), rtol=1e-6)
    soft = teacher_target(lp, {"form": "prob", "value": 0.5}, norm="prob-softmax").numpy()
    np.testing.assert_allclose(soft, _softmax(p / 0.5), rtol=1e-6)
    # prob-softmax with no record is the paper's c = 1; logit with no record renormalises.
    np.testing.assert_allclose(teacher_target(lp, None, norm="prob-softmax").numpy(), _softmax(p), rtol=1e-6)
    np.testing.assert_allclose(teacher_target(lp, None, norm="logit").numpy(), p / p.sum(-1, keepdims=True),
                               rtol=1e-6)
    auto = teacher_target(lp, {"form": "logit", "value": 2.0}).numpy()
    np.testing.assert_allclose(auto, _softmax(np.log(p) / 2.0), rtol=1e-6)
    with pytest.raises(ValueError, match="prob form"):
        teacher_target(lp, {"form": "prob", "value": 0.5}, norm="logit")


def test_label_smoothing_moves_a_fraction_of_the_top1_evenly_to_the_others():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], dtype=torch.float64)
    got = smooth_top1(probs, 0.2).numpy()
    want = np.array([[0.1 + 0.07, 0.7 * 0.8, 0.2 + 0.07], [0.5 * 0.8, 0.3 + 0.05, 0.2 + 0.05]])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.allclose(got.sum(-1), 1.0)
    np.testing.assert_allclose(smooth_top1(probs, 0.0).numpy(), probs.numpy())


def _fit(loss_fn, steps=3000, vocab=30, seed=0):
    """Free student logits for two positions, fitted by Adam to one loss; the final softmax."""
    g = torch.Generator().manual_seed(seed)
    # Start with little mass on the teacher's ids (as a fresh student's random head has).
    z = (torch.randn(2, vocab, generator=g, dtype=torch.float64) * 0.1)
    z[:, :3] -= 4.0
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(z).backward()
        opt.step()
    return torch.softmax(z.detach(), dim=-1)


def test_the_default_loss_keeps_the_students_topk_mass_at_the_teachers():
    """The bucket (the default of `distill --loss first`) ties the student's full-vocabulary mass on the
    teacher's ids to the teacher's; the renormalised form leaves it wherever it started."""
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    lp = _logp([[0.6, 0.25, 0.1], [0.3, 0.3, 0.3]])  # top-3 masses 0.95 and 0.90
    teacher_mass = lp.exp().sum(-1)
    record = {"form": "prob", "value": 0.4}
    with_bucket = teacher_target(lp, record, other_bucket=True)
    without = teacher_target(lp, record, other_bucket=False)
    q_bucket = _fit(lambda z: distillation_loss(z, None, ids, with_bucket, other_bucket=True))
    q_plain = _fit(lambda z: distillation_loss(z, None, ids, without, other_bucket=False))
    torch.testing.assert_close(q_bucket[:, :3].sum(-1), teacher_mass, rtol=0, atol=5e-3)
    assert float(q_plain[:, :3].sum(-1).max()) < 0.5  # never pushed up: nothing in the loss asks for it
    # Both learn the same shape over the ids (the tempered top-k), only the bucket also fixes the mass.
    for q in (q_bucket, q_plain):
        torch.testing.assert_close(q[:, :3] / q[:, :3].sum(-1, keepdim=True), without.double(), rtol=0, atol=5e-3)
    assert math.isfinite(float(q_bucket.sum()))
