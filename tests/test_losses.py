"""Losses: independent oracles (torch's kl_div / cross_entropy, autograd, hand numbers) and invariants."""

import math

import pytest
import torch
import torch.nn.functional as F

from first_kd.losses import (
    IGNORE_INDEX,
    chunked_distillation_loss,
    cross_entropy,
    distillation_loss,
    sparse_kl,
)
from first_kd.temperature import teacher_distribution


def _topk_case(n, v, k, gen, scale=3.0, other_bucket=False, dtype=torch.float32):
    """Random student logits [n, v], distinct teacher ids [n, k] and teacher probs [n, k(+1)]."""
    logits = (scale * torch.randn(n, v, generator=gen)).to(dtype)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    teacher_logprobs = torch.log_softmax(2.0 * torch.randn(n, v, generator=gen), -1).gather(1, ids)
    probs = teacher_distribution(teacher_logprobs, None, other_bucket=other_bucket)
    return logits, ids, probs


# ---------------------------------------------------------------------------------------------------
# Oracles on full distributions
# ---------------------------------------------------------------------------------------------------


def test_full_vocab_topk_equals_dense_kl_div():
    gen = torch.Generator().manual_seed(0)
    n, v = 6, 11
    student = 2.0 * torch.randn(n, v, generator=gen)
    teacher = torch.softmax(2.0 * torch.randn(n, v, generator=gen), -1)
    oracle = F.kl_div(torch.log_softmax(student, -1), teacher, reduction="batchmean")
    # The ids in a shuffled order per row: the loss must not care about the order.
    ids = torch.stack([torch.randperm(v, generator=gen) for _ in range(n)])
    got = sparse_kl(student, ids, teacher.gather(1, ids))
    torch.testing.assert_close(got, oracle, rtol=1e-5, atol=1e-6)
    # other_bucket with k = V: the rest is empty on both sides and adds nothing.
    with_empty_rest = torch.cat([teacher.gather(1, ids), torch.zeros(n, 1)], 1)
    torch.testing.assert_close(sparse_kl(student, ids, with_empty_rest, other_bucket=True), oracle,
                               rtol=1e-5, atol=1e-6)
    # other_bucket with k = V - 1: the rest is exactly one token, so the coarsening loses nothing.
    ids_m1 = ids[:, :-1]
    p_m1 = torch.cat([teacher.gather(1, ids_m1), teacher.gather(1, ids[:, -1:])], 1)
    torch.testing.assert_close(sparse_kl(student, ids_m1, p_m1, other_bucket=True), oracle,
                               rtol=1e-5, atol=1e-6)


def test_other_bucket_matches_coarsened_dense_kl_and_gradient_is_finite_at_k_equals_v():
    gen = torch.Generator().manual_seed(1)
    n, v, k = 7, 30, 4
    student, ids, p = _topk_case(n, v, k, gen, other_bucket=True)
    q_full = torch.softmax(student.double(), -1)
    q_k = q_full.gather(1, ids)
    q = torch.cat([q_k, 1 - q_k.sum(1, keepdim=True)], 1)
    oracle = F.kl_div(q.log(), p.double(), reduction="batchmean")
    torch.testing.assert_close(sparse_kl(student, ids, p, other_bucket=True).double(), oracle,
                               rtol=1e-5, atol=1e-6)

    # k = V: the student's rest is empty; the gradient must still be finite (no 0 * NaN).
    z = torch.randn(3, 5, generator=gen, requires_grad=True)
    full_ids = torch.arange(5).repeat(3, 1)
    p_full = torch.cat([torch.softmax(torch.randn(3, 5, generator=gen), -1), torch.zeros(3, 1)], 1)
    sparse_kl(z, full_ids, p_full, other_bucket=True).backward()
    assert torch.isfinite(z.grad).all()


def test_prob_form_temperature_into_kl_matches_hand_computation():
    # Teacher top-3 probs 0.5, 0.2, 0.1; FIRST prob form with c = 0.5: softmax([1.0, 0.4, 0.2])
    #   = [e, e^0.4, e^0.2] / (e + e^0.4 + e^0.2) = [0.5004653, 0.2746612, 0.2248735].
    p = teacher_distribution(torch.log(torch.tensor([[0.5, 0.2, 0.1]])), form="prob", value=0.5)
    torch.testing.assert_close(p, torch.tensor([[0.5004653, 0.2746612, 0.2248735]]), rtol=0, atol=1e-6)
    # Student logits 2, 1, 0 at the ids (and -1 at the id the teacher did not keep):
    #   q = [e^2, e, 1] / (e^2 + e + 1) = [0.6652410, 0.2447285, 0.0900306]
    #   KL = sum p log(p / q) = 0.5004653 ln(0.7523) + 0.2746612 ln(1.1223) + 0.2248735 ln(2.4977)
    #      = 0.0951016
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    got = sparse_kl(logits, torch.tensor([[0, 1, 2]]), p)
    assert abs(float(got) - 0.0951016) < 1e-6


def test_cross_entropy_matches_torch_with_label_smoothing_and_ignore_index():
    gen = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(9, 13, generator=gen)
    targets = torch.randint(0, 13, (9,), generator=gen)
    targets[[1, 5]] = IGNORE_INDEX
    for eps in (0.0, 0.1, 1.0):
        for reduction in ("mean", "sum", "none"):
            want = F.cross_entropy(logits, targets, label_smoothing=eps, reduction=reduction)
            got = cross_entropy(logits, targets, label_smoothing=eps, reduction=reduction)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("other_bucket", [False, True])
def test_identical_distributions_give_zero_loss_and_zero_gradient(other_bucket):
    gen = torch.Generator().manual_seed(3)
    n, v, k, hdim = 8, 40, 5, 6
    hidden = torch.randn(n, hdim, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, hdim, generator=gen, dtype=torch.float64, requires_grad=True)
    z = hidden @ weight.t()
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    q = torch.softmax(z.detach(), -1).gather(1, ids)
    p = torch.cat([q, 1 - q.sum(1, keepdim=True)], 1) if other_bucket else q / q.sum(1, keepdim=True)
    for loss in (
        sparse_kl(z, ids, p, other_bucket=other_bucket),
        chunked_distillation_loss(hidden, weight, None, ids, p, other_bucket=other_bucket, chunk_size=3),
    ):
        gh, gw = torch.autograd.grad(loss, [hidden, weight])
        assert abs(loss.item()) < 1e-10
        assert gh.abs().max() < 1e-10 and gw.abs().max() < 1e-10


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3, 1e4])
@pytest.mark.parametrize("other_bucket", [False, True])
def test_kl_is_never_negative_and_stays_finite_with_extreme_logits(scale, other_bucket):
    gen = torch.Generator().manual_seed(4)
    logits, ids, p = _topk_case(64, 50, 5, gen, scale=scale, other_bucket=other_bucket)
    logits.requires_grad_(True)
    rows = sparse_kl(logits, ids, p, other_bucket=other_bucket, reduction="none")
    assert torch.isfinite(rows).all()
    assert (rows >= -1e-6).all(), rows.min()
    rows.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_reductions_are_consistent_and_accumulation_equals_one_big_batch():
    gen = torch.Generator().manual_seed(5)
    logits, ids, p = _topk_case(10, 20, 3, gen)
    targets = torch.randint(0, 20, (10,), generator=gen)
    targets[[0, 7]] = IGNORE_INDEX
    kw = dict(teacher_ids=ids, teacher_probs=p, alpha=0.4, label_smoothing=0.1)
    rows = distillation_loss(logits, targets, reduction="none", **kw)
    total = distillation_loss(logits, targets, reduction="sum", **kw)
    mean = distillation_loss(logits, targets, reduction="mean", **kw)
    assert rows[0] == 0 and rows[7] == 0
    torch.testing.assert_close(rows.sum(), total)
    torch.testing.assert_close(mean, total / 8)
    # Two micro-batches summed, divided by all their target positions == the mean of the whole.
    halves = sum(distillation_loss(logits[s], targets[s], teacher_ids=ids[s], teacher_probs=p[s],
                                   alpha=0.4, label_smoothing=0.1, reduction="sum")
                 for s in (slice(0, 4), slice(4, 10)))
    torch.testing.assert_close(halves / 8, mean)
    # Leading dims are kept by "none".
    assert distillation_loss(logits.view(2, 5, 20), targets.view(2, 5), reduction="none").shape == (2, 5)


@pytest.mark.parametrize("chunked", [False, True])
def test_masked_rows_contribute_nothing_even_when_they_hold_garbage(chunked):
    gen = torch.Generator().manual_seed(6)
    n, v, k, hdim = 9, 25, 4, 5
    hidden = torch.randn(n, hdim, generator=gen, requires_grad=True)
    weight = torch.randn(v, hdim, generator=gen, requires_grad=True)
    _, ids, p = _topk_case(n, v, k, gen, other_bucket=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    mask = torch.ones(n, dtype=torch.bool)
    mask[[2, 6]] = False
    targets[4] = IGNORE_INDEX
    dropped = ~mask
    dropped[4] = True
    bad_ids, bad_p = ids.clone(), p.clone()
    bad_ids[dropped] = -1  # out of range: must not even be looked at
    bad_p[dropped] = float("nan")

    def loss(h, w, ids_, p_, t_, m_):
        kw = dict(teacher_ids=ids_, teacher_probs=p_, alpha=0.3, other_bucket=True, mask=m_)
        if chunked:
            return chunked_distillation_loss(h, w, t_, chunk_size=4, **kw)
        return distillation_loss(h @ w.t(), t_, **kw)

    got = loss(hidden, weight, bad_ids, bad_p, targets, mask)
    gh, gw = torch.autograd.grad(got, [hidden, weight])
    keep = ~dropped
    want = loss(hidden[keep], weight, ids[keep], p[keep], targets[keep], None)
    wh, ww = torch.autograd.grad(want, [hidden, weight])  # wh is zero at the dropped rows
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gw, ww)
    torch.testing.assert_close(gh, wh)
    assert (gh[dropped] == 0).all() and (gh[keep] != 0).any()


def test_no_target_rows_give_zero_not_nan():
    z = torch.randn(3, 7, requires_grad=True)
    t = torch.full((3,), IGNORE_INDEX)
    loss = cross_entropy(z, t)
    loss.backward()
    assert loss.item() == 0.0 and (z.grad == 0).all()
    h = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(7, 4, requires_grad=True)
    loss = chunked_distillation_loss(h, w, t)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all() and (w.grad == 0).all()


def test_bf16_inputs_give_fp32_results_close_to_fp32():
    gen = torch.Generator().manual_seed(7)
    n, v, k, hdim = 32, 64, 5, 16
    h32 = torch.randn(n, hdim, generator=gen)
    w32 = torch.randn(v, hdim, generator=gen) / 4
    _, ids, p = _topk_case(n, v, k, gen, other_bucket=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    kw = dict(teacher_ids=ids, teacher_probs=p, alpha=0.5, other_bucket=True, label_smoothing=0.1)
    z16 = (h32 @ w32.t()).bfloat16()
    got = distillation_loss(z16, targets, **kw)
    assert got.dtype == torch.float32
    # Same (rounded) logits in fp32: the loss math itself must not lose anything to bf16.
    torch.testing.assert_close(got, distillation_loss(z16.float(), targets, **kw), rtol=1e-6, atol=1e-6)
    ref = distillation_loss(h32 @ w32.t(), targets, **kw)
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)

    h16 = h32.bfloat16().requires_grad_(True)
    w16 = w32.bfloat16().requires_grad_(True)
    chunked = chunked_distillation_loss(h16, w16, targets, chunk_size=10, **kw)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, ref, rtol=2e-2, atol=2e-2)
    chunked.backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    h32r, w32r = h32.clone().requires_grad_(True), w32.clone().requires_grad_(True)
    distillation_loss(h32r @ w32r.t(), targets, **kw).backward()
    torch.testing.assert_close(w16.grad.float(), w32r.grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(h16.grad.float(), h32r.grad, rtol=5e-2, atol=5e-3)


# ---------------------------------------------------------------------------------------------------
# Chunked head == full logits
# ---------------------------------------------------------------------------------------------------

KINDS = {
    "first_kl": dict(alpha=0.0),
    "kl_other_bucket": dict(alpha=0.0, other_bucket=True),
    "ce": dict(teacher=False),
    "ce_label_smoothing": dict(teacher=False, label_smoothing=0.2),
    "mix": dict(alpha=0.3),
    "mix_bucket_smoothing": dict(alpha=0.6, other_bucket=True, label_smoothing=0.1),
    "alpha_one": dict(alpha=1.0),
}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_chunked_equals_unchunked_value_and_gradients(kind, reduction, bias):
    spec = dict(KINDS[kind])
    use_teacher = spec.pop("teacher", True)
    gen = torch.Generator().manual_seed(8)
    n, v, k, hdim = 23, 37, 5, 8
    hidden = torch.randn(n, hdim, generator=gen, requires_grad=True)
    weight = torch.randn(v, hdim, generator=gen, requires_grad=True)
    b = torch.randn(v, generator=gen, requires_grad=True) if bias else None
    _, ids, p = _topk_case(n, v, k, gen, other_bucket=spec.get("other_bucket", False))
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[[3, 11]] = IGNORE_INDEX
    teacher = dict(teacher_ids=ids, teacher_probs=p) if use_teacher else {}
    params = [hidden, weight] + ([b] if bias else [])

    logits = hidden @ weight.t() + (b if bias else 0)
    want = distillation_loss(logits, targets, reduction=reduction, **teacher, **spec)
    want_grads = torch.autograd.grad(want, params)
    for chunk_size in (1, 5, 23, 64):
        got = chunked_distillation_loss(hidden, weight, targets, chunk_size=chunk_size, reduction=reduction,
                                        head_bias=b, **teacher, **spec)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(torch.autograd.grad(got, params), want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_distillation_loss(hidden, weight, targets, chunk_size=7, reduction=reduction,
                                      head_bias=b, **teacher, **spec), want, rtol=1e-5, atol=1e-6)


def test_chunked_loss_on_a_tiny_llama_matches_full_logits_for_every_parameter(tmp_path):
    from transformers import AutoModelForCausalLM

    from first_kd.tiny import build_llama, train_tokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    model = AutoModelForCausalLM.from_pretrained(str(build_llama(tmp_path / "m", tok, hidden_size=32)))
    # Tie the head to the input embedding: the shared weight gets both gradient contributions.
    model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator().manual_seed(9)
    v = model.config.vocab_size
    input_ids = torch.randint(0, v, (2, 12), generator=gen)
    targets = input_ids[:, 1:].reshape(-1)
    _, ids, p = _topk_case(targets.numel(), v, 5, gen)
    kw = dict(teacher_ids=ids, teacher_probs=p, alpha=0.25)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: q.grad.clone() for n, q in model.named_parameters()}

    logits = model(input_ids).logits[:, :-1].reshape(-1, v)
    want = grads(distillation_loss(logits, targets, **kw))
    hidden = model.model(input_ids).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
    got = grads(chunked_distillation_loss(hidden, model.lm_head.weight, targets, chunk_size=7, **kw))
    assert want.keys() == got.keys() and len(got) > 5
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["first_kl", "mix_bucket_smoothing"])
def test_gradcheck_chunked_function_in_double(kind):
    spec = dict(KINDS[kind])
    gen = torch.Generator().manual_seed(10)
    n, v, k, hdim = 5, 7, 2, 3
    hidden = torch.randn(n, hdim, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, hdim, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True)
    _, ids, p = _topk_case(n, v, k, gen, other_bucket=spec.get("other_bucket", False))
    targets = torch.randint(0, v, (n,), generator=gen)

    def f(h, w, bias):
        return chunked_distillation_loss(h, w, targets, ids, p.double(), chunk_size=2, head_bias=bias, **spec)

    assert torch.autograd.gradcheck(f, (hidden, weight, b), eps=1e-6, atol=1e-7)


def test_chunked_grad_scales_with_grad_output_and_survives_retain_graph():
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(6, 4, generator=gen, requires_grad=True)
    weight = torch.randn(9, 4, generator=gen, requires_grad=True)
    targets = torch.randint(0, 9, (6,), generator=gen)
    loss = chunked_distillation_loss(hidden, weight, targets, chunk_size=4)
    (g1,) = torch.autograd.grad(loss, [weight], retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * loss, [weight])
    torch.testing.assert_close(g3, 3.0 * g1)


# ---------------------------------------------------------------------------------------------------
# Misuse
# ---------------------------------------------------------------------------------------------------


def test_misuse_raises_clear_value_errors():
    z = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    ids = torch.tensor([[0, 1]] * 4)
    p = torch.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="out of range"):
        sparse_kl(z, ids + 9, p)
    with pytest.raises(ValueError, match="distinct"):
        sparse_kl(z, torch.tensor([[3, 3]] * 4), p)
    with pytest.raises(ValueError, match="k \\+ 1"):
        sparse_kl(z, ids, p, other_bucket=True)
    with pytest.raises(ValueError, match="both teacher_ids and teacher_probs"):
        distillation_loss(z, t, teacher_ids=ids)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(z, t, ids, p, alpha=1.5)
    with pytest.raises(ValueError, match="targets are needed"):
        distillation_loss(z, None, ids, p, alpha=0.5)
    with pytest.raises(ValueError, match="targets out of range"):
        cross_entropy(z, t + 10)
    with pytest.raises(ValueError, match="reduction"):
        chunked_distillation_loss(torch.randn(4, 3), torch.randn(10, 3), t, reduction="none")
    with pytest.raises(ValueError, match="head_weight"):
        chunked_distillation_loss(torch.randn(4, 3), torch.randn(10, 5), t)
    assert math.isfinite(float(cross_entropy(z, t)))
