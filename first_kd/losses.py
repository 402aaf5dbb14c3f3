"""Distillation losses: sparse top-k KL, cross-entropy, their mix, and a chunked memory-efficient head.

Every loss is a pure function of tensors; the trainer decides what the teacher distribution is. For
FIRST it passes teacher probabilities with the store's temperature applied, for plain KD without it,
both built by `first_kd.temperature`. The losses never see a temperature.

Definitions (per target position, i.e. per row):
  * KL: forward KL(p || q). p is the teacher's top-k distribution [k] over `teacher_ids`; q is the
    student's full-vocabulary softmax restricted to the same ids and renormalised over them, which is
    exactly softmax(student_logits[teacher_ids]), so no full softmax is needed. With
    ``other_bucket=True`` p has k+1 entries, the last the teacher's mass outside the top-k, and q gets
    the matching (k+1)-th category 1 - sum_k softmax(student_logits)[ids], computed in log space from
    the logits outside the top-k, so it stays accurate when it is tiny. The student's rest log-mass
    is floored at log(float32 tiny) (about -87): below that the category carries no gradient instead
    of an infinite one (it only binds when k covers the whole vocabulary).
  * CE: cross-entropy on the next-token ids, label smoothing as in torch.nn.functional.cross_entropy:
    (1 - eps) * nll + eps * mean_over_vocab(-log q).
  * mix: (1 - alpha) * KL + alpha * CE. Without a teacher the loss is CE, whatever alpha is.

Variable-k rows (top-p caches, rows of different k in one batch): teacher_ids / teacher_probs are padded
to [N, k_max], a row's real columns first, then padding columns with a negative id (-1) and teacher
probability 0 (first_kd.temperature gives exactly that from the cache's -inf log-probs). Column 0 of a
counted row is real. The student's side ignores padding columns entirely (its softmax over the ids, its
rest mass with the other bucket and the prob-softmax / linear normalisations are over the real ids only),
so a padded row's loss and gradients are those of the row with its real columns alone; the other bucket
stays the last column (index k_max). `_pad_columns` is the one place a padding column is recognised.

Which rows count (ignore conventions): a row is a target position when ``targets != ignore_index``
(-100, the Hugging Face / PyTorch convention) and, if a boolean ``mask`` [N] is given, ``mask`` is True.
Other rows (padding, prompt tokens) contribute nothing to the value or the gradient, whatever their
teacher ids or probabilities hold (they may be garbage: out-of-range ids, NaN probabilities).

Reduction: "mean" averages over all target positions of all sequences in the batch (a token-level
mean, so a long sequence weighs more than a short one); it returns 0 when there are none, rather than
NaN, so one all-padding micro-batch cannot poison training. "sum" lets a trainer that accumulates
gradients over micro-batches divide by the total number of target positions of the whole accumulated
batch, which makes accumulation equal to one big batch. "none" returns per-row losses (0 at ignored
rows) in the leading shape of the inputs (full-logit functions only).

Precision: all softmax / log / loss arithmetic is fp32 whatever the logits' dtype (bf16 / fp16 are
upcast; float64 stays float64, which is what gradcheck needs). The chunked head
runs its matmuls in the inputs' dtype (as the model's own lm_head would) and upcasts each chunk's logits.

Sampled caches (RS-KD, `sampled_kd_loss` / `chunked_sampled_kd_loss`): instead of a top-k, a position
holds n ids drawn with replacement from a proposal q (first_kd.engines.sampling), with counts c. With the
target's log-prob p and q known at each sampled id, sum_i c_i p / (n q) * (-log s(x_i)) is an unbiased
estimate of the full-vocabulary CE(p, s) and its gradient of s - p (s = the student's full softmax);
KL = CE - H with H supplied or estimated from the same draws. Which targets have an exact per-id
log-prob on a sampled cache (and so an unbiased loss) is first_kd.temperature's to say; a target known
only up to its normaliser goes through the "self-normalised" estimator, consistent with bias O(1/n).
The losses still never see a temperature.

`chunked_distillation_loss` takes the final hidden states and the head weight instead of logits and
never holds [N, V] logits for all rows: a custom autograd function computes each chunk's logits, loss
and closed-form gradients in the forward pass, keeps only grad w.r.t. hidden [N, H] and head weight
[V, H], and scales them by grad_output in backward. For the pure top-k KL (alpha = 0, no other
bucket) the loss depends only on the k gathered logits, so the head is evaluated at the k ids only and
the [N, V] matmul is skipped altogether.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")

# log of the smallest normal fp32: the floor of the student's rest log-mass with other_bucket.
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------------------------------
# Argument checks and row selection
# ---------------------------------------------------------------------------------------------------


def target_mask(
    targets: Optional[torch.Tensor], mask: Optional[torch.Tensor] = None, n_rows: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Which rows are target positions: [N] bool = (targets != ignore_index) & mask.

    Args:
        targets: [...] long next-token ids, or None (then every row counts unless masked).
        mask: [...] bool (same leading shape), True where the row counts; None means all.
        n_rows: number of rows, needed only when both are None.
    """
    if targets is not None:
        valid = targets.reshape(-1) != ignore_index
        if mask is not None:
            valid = valid & mask.reshape(-1).to(torch.bool)
        return valid
    if mask is not None:
        return mask.reshape(-1).to(torch.bool)
    if n_rows is None:
        raise ValueError("target_mask needs targets, mask or n_rows")
    return torch.ones(n_rows, dtype=torch.bool)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half/bf16/fp32 inputs; float64 stays float64 (so gradcheck can run in double)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_options(alpha: float, label_smoothing: float, reduction: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (the weight of CE in the mix), got {alpha}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: use one of {REDUCTIONS}")


def _flat_teacher(teacher_ids, teacher_probs, n_rows: int, other_bucket: bool):
    """Flatten teacher tensors to [N, k] / [N, k(+1)] and check they agree."""
    if (teacher_ids is None) != (teacher_probs is None):
        raise ValueError("pass both teacher_ids and teacher_probs, or neither (pure cross-entropy)")
    if teacher_ids is None:
        return None, None
    if teacher_ids.is_floating_point() or teacher_ids.is_complex():
        raise ValueError(f"teacher_ids must be integer token ids, got dtype {teacher_ids.dtype}")
    k = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, k).long()
    probs = _upcast(teacher_probs.reshape(-1, teacher_probs.shape[-1]))
    want = k + 1 if other_bucket else k
    if ids.shape[0] != n_rows or probs.shape != (n_rows, want):
        raise ValueError(
            f"teacher shapes do not match: {n_rows} rows, teacher_ids {tuple(teacher_ids.shape)}, "
            f"teacher_probs {tuple(teacher_probs.shape)}; teacher_probs needs last dim "
            f"{want} (k{' + 1 with other_bucket' if other_bucket else ''})"
        )
    return ids, probs


def _loss_terms(teacher_ids, teacher_probs, targets, n_rows: int, alpha: float, other_bucket: bool, what: str):
    """Flattened teacher tensors and which terms the loss has: (ids, probs, use_kl, use_ce)."""
    ids, probs = _flat_teacher(teacher_ids, teacher_probs, n_rows, other_bucket)
    use_kl = ids is not None and alpha < 1.0
    use_ce = ids is None or alpha > 0.0
    if use_ce and targets is None:
        raise ValueError("targets are needed for the cross-entropy term (alpha > 0 or no teacher)")
    if targets is not None and targets.numel() != n_rows:
        raise ValueError(f"targets have {targets.numel()} rows but {what} {n_rows}")
    return ids, probs, use_kl, use_ce


def _pad_columns(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(safe_ids, pad) for teacher ids [N, k]: pad is True at padding columns (negative ids), and safe_ids
    holds the row's column-0 id there, so gathers and scatters stay in range (the caller makes the values
    at those columns neutral: a large finite negative logit, a zero gradient)."""
    pad = ids < 0
    return torch.where(pad, ids[:, :1], ids), pad


def _check_ids(ids: torch.Tensor, vocab_size: int, probs: Optional[torch.Tensor] = None) -> None:
    """Ids of counted rows: column 0 real, real ids (>= 0; negative = padding) in range and distinct within a
    row (as torch.topk gives); with `probs`, the teacher's probability 0 at every padding column."""
    if ids.numel() == 0:
        return
    pad = ids < 0
    if bool(pad[:, 0].any()):
        raise ValueError("a counted row has no teacher id (column 0 is padding): mask it out or set its target "
                         f"to {IGNORE_INDEX}")
    if int(ids.max()) >= vocab_size:
        raise ValueError(
            f"teacher_ids out of range [0, {vocab_size}): the teacher store and student must share a "
            "vocabulary (mask padding rows or set their targets to -100)"
        )
    # Padding columns get distinct negative stand-ins, so only real ids can repeat.
    distinct_pads = -1 - torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    s = torch.where(pad, distinct_pads, ids).sort(dim=1).values
    if bool((s[:, 1:] == s[:, :-1]).any()):
        raise ValueError("teacher_ids repeat an id within a row: top-k ids must be distinct")
    if probs is not None and bool((probs[:, : ids.shape[1]][pad] != 0).any()):
        raise ValueError("teacher_probs must be 0 at padding columns (negative teacher_ids)")


def _check_targets(t: torch.Tensor, vocab_size: int) -> None:
    """Targets of counted rows must be vocabulary ids."""
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
        raise ValueError(f"targets out of range [0, {vocab_size}): use {IGNORE_INDEX} for ignored rows")


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str, lead_shape) -> torch.Tensor:
    """rows [N] fp32 (already 0 at ignored rows) -> scalar, or [lead_shape] for "none"."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Full-logit losses (plain autograd)
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StudentNorm:
    """How the student's distribution r over the teacher's ids is formed from its logits z [N, V].

    kind:
      * "logit" (default): r = softmax(z[ids]), the student renormalised over the ids; with the other
        bucket, r = [q[ids], 1 - sum q[ids]] for q = softmax(z), its full-vocabulary probabilities.
      * "prob-softmax" (the FIRST authors' `--use_norm softmax`): r = softmax(q / temperature) over the
        full-vocabulary probabilities q[ids] (and the rest 1 - sum q[ids] with the other bucket).
      * "linear" (their `--use_norm linear`): r = (q + eps) / sum(q + eps) over the same entries.
    The last two depend on the absolute probabilities, so they hold the student's mass on the ids even
    without the other bucket; "logit" without the bucket constrains only the logits' differences.
    """

    kind: str = "logit"
    temperature: float = 1.0
    eps: float = 1e-6

    def __post_init__(self):
        if self.kind not in STUDENT_NORMS:
            raise ValueError(f"unknown student normalisation {self.kind!r}: use one of {STUDENT_NORMS}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"student temperature must be a finite number > 0, got {self.temperature}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")


STUDENT_NORMS = ("logit", "prob-softmax", "linear")
LOGIT_NORM = StudentNorm()


def student_log_probs(z: torch.Tensor, ids: torch.Tensor, other_bucket: bool,
                      norm: StudentNorm = LOGIT_NORM) -> torch.Tensor:
    """log r [N, k] (or [N, k+1] with the other bucket): the student's side of the KL, see `StudentNorm`.

    z [N, V] fp32 logits; ids [N, k] long (negative at padding columns). At a padding column log r is
    finfo(z.dtype).min, a constant (no gradient) and finite (not -inf, so a teacher 0 times it is 0).
    """
    # Finite sentinels, not -inf: -inf times a teacher 0 is NaN, and when the ids cover the whole
    # vocabulary the rest is empty and logsumexp over all -inf has a NaN gradient even where it is
    # multiplied by zero.
    low = torch.finfo(z.dtype).min
    ids, pad = _pad_columns(ids)
    g = z.gather(1, ids)
    if norm.kind == "logit" and not other_bucket:
        return torch.log_softmax(g.masked_fill(pad, low), dim=-1).masked_fill(pad, low)
    lse = torch.logsumexp(z, dim=-1)
    logq = (g - lse.unsqueeze(1)).masked_fill(pad, low)
    if other_bucket:
        rest = z.scatter(1, ids, low)
        log_other = (torch.logsumexp(rest, dim=-1) - lse).clamp(min=LOG_TINY)
        logq = torch.cat([logq, log_other.unsqueeze(1)], dim=1)
        pad = torch.cat([pad, pad.new_zeros(pad.shape[0], 1)], dim=1)
    if norm.kind == "logit":
        return logq
    if norm.kind == "prob-softmax":
        return torch.log_softmax((torch.exp(logq) / norm.temperature).masked_fill(pad, low), dim=-1).masked_fill(
            pad, low)
    shifted = torch.exp(logq) + norm.eps
    total = shifted.masked_fill(pad, 0.0).sum(dim=-1, keepdim=True)
    return (torch.log(shifted) - torch.log(total)).masked_fill(pad, low)


def _kl_rows(z: torch.Tensor, ids: torch.Tensor, p: torch.Tensor, other_bucket: bool,
             norm: StudentNorm = LOGIT_NORM) -> torch.Tensor:
    """KL(p || r) per row. z [N, V] fp32, ids [N, k], p [N, k] or [N, k+1] fp32 -> [N]."""
    logr = student_log_probs(z, ids, other_bucket, norm)
    # xlogy: 0 * log 0 = 0, so teacher zeros (padding, empty rest) add nothing.
    return torch.xlogy(p, p).sum(-1) - (p * logr).sum(-1)


def _ce_rows(z: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy per row. z [N, V] fp32, targets [N] valid ids -> [N]."""
    logp = torch.log_softmax(z, dim=-1)
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)


def sparse_kl(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    other_bucket: bool = False,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    student_norm: StudentNorm = LOGIT_NORM,
) -> torch.Tensor:
    """Forward KL(teacher top-k || student on the same ids), see the module docstring.

    Args:
        student_logits: [N, V] (or [..., V]) student logits, any float dtype.
        teacher_ids: [N, k] long top-k token ids.
        teacher_probs: [N, k] teacher probabilities over the ids (summing to 1), or [N, k+1] with
            the rest mass last when ``other_bucket``.
        other_bucket: compare the (k+1)-category coarsening instead of renormalising over the ids.
        reduction: "mean" over counted rows, "sum", or "none" ([...] per row).
        mask: [N] bool, False for rows to ignore (padding).

    Returns:
        fp32 scalar, or [...] per-row losses for "none".
    """
    return distillation_loss(
        student_logits, None, teacher_ids, teacher_probs, alpha=0.0, other_bucket=other_bucket,
        reduction=reduction, mask=mask, student_norm=student_norm,
    )


def cross_entropy(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Cross-entropy, matching torch.nn.functional.cross_entropy (label smoothing included) except
    that "mean" over zero counted rows is 0, not NaN.

    Args:
        student_logits: [N, V] (or [..., V]) logits, any float dtype (computed in fp32).
        targets: [N] long ids; ``ignore_index`` (-100) rows are ignored.
        label_smoothing: eps in [0, 1].
        reduction: "mean" over counted rows, "sum", or "none".
        mask: [N] bool, False for rows to ignore.

    Returns:
        fp32 scalar, or [...] per-row losses for "none".
    """
    return distillation_loss(
        student_logits, targets, label_smoothing=label_smoothing, reduction=reduction, mask=mask,
        ignore_index=ignore_index,
    )


def distillation_loss(
    student_logits: torch.Tensor,
    targets: Optional[torch.Tensor],
    teacher_ids: Optional[torch.Tensor] = None,
    teacher_probs: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    other_bucket: bool = False,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    student_norm: StudentNorm = LOGIT_NORM,
) -> torch.Tensor:
    """(1 - alpha) * KL + alpha * CE on full student logits; pure CE when teacher_* are None.

    Args:
        student_logits: [N, V] (or [..., V]) logits, any float dtype (computed in fp32).
        targets: [N] long next-token ids (-100 = ignored row). May be None when no CE term is
            needed (a teacher is given and alpha == 0); then only ``mask`` selects rows.
        teacher_ids: [N, k] long, or None.
        teacher_probs: [N, k] (or [N, k+1] with ``other_bucket``) probabilities, or None.
        alpha: weight of CE in [0, 1].
        other_bucket, label_smoothing, reduction, mask, ignore_index: see the module docstring.
        student_norm: how the student's side of the KL is formed (`StudentNorm`; default: renormalised logits).

    Returns:
        fp32 scalar, or [...] per-row losses for "none".
    """
    _check_options(alpha, label_smoothing, reduction)
    lead_shape = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    z = _upcast(student_logits.reshape(-1, V))
    N = z.shape[0]
    ids, probs, use_kl, use_ce = _loss_terms(teacher_ids, teacher_probs, targets, N, alpha, other_bucket, "the logits")
    valid = target_mask(targets, mask, N, ignore_index).to(z.device)

    rows = z.new_zeros(N)
    if use_kl:
        # Ignored rows may hold anything; neutral stand-ins keep NaN out of the (zero-weighted) grads.
        ids = ids.masked_fill(~valid.unsqueeze(1), 0)
        probs = probs.masked_fill(~valid.unsqueeze(1), 0.0)
        _check_ids(ids[valid], V, probs[valid])
        kl_weight = 1.0 - alpha if use_ce else 1.0
        rows = rows + kl_weight * _kl_rows(z, ids, probs, other_bucket, student_norm)
    if use_ce:
        _check_targets(targets.reshape(-1)[valid], V)
        t = targets.reshape(-1).masked_fill(~valid, 0)
        ce_weight = alpha if use_kl else 1.0
        rows = rows + ce_weight * _ce_rows(z, t, label_smoothing)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return _reduce(rows, valid, reduction, lead_shape)


# ---------------------------------------------------------------------------------------------------
# Chunked head: closed-form gradients, never the full [N, V]
# ---------------------------------------------------------------------------------------------------


def _dense_chunk(z, targets, ids, probs, alpha, eps, other_bucket, grad_scale):
    """Loss and d(loss)/d(logits) for one chunk whose loss needs the full vocabulary.

    z: [c, V] fp32 logits, a fresh buffer that is overwritten with the gradient.
    targets: [c] or None (no CE); ids [c, k] / probs [c, k(+1)] or None (no KL).
    grad_scale: factor folded into the gradient (the reduction's row weight); None = no gradient.
    Returns (per-row losses [c] unweighted, gradient [c, V] fp32 or None).
    """
    V = z.shape[1]
    use_ce = targets is not None
    use_kl = ids is not None
    w_kl = (1.0 - alpha) if use_ce else 1.0
    w_ce = alpha if use_kl else 1.0
    if use_ce:
        z_t = z.gather(1, targets.unsqueeze(1)).squeeze(1)
        sum_z = z.sum(1) if eps > 0 else None
    if use_kl:
        ids, pad = _pad_columns(ids)  # padding: a logit that adds nothing, a gradient of exactly 0
        g = z.gather(1, ids).masked_fill(pad, torch.finfo(z.dtype).min)
        if other_bucket:
            z.scatter_(1, ids, float("-inf"))  # z now holds the rest only; its max can be -inf
    m = z.amax(1, keepdim=True)
    if use_kl and other_bucket:
        m = torch.maximum(m, g.amax(1, keepdim=True))
    z.sub_(m).exp_()  # exp(z - m): q up to the row's normaliser, 0 at masked ids
    s = z.sum(1)
    if use_kl and other_bucket:
        s_rest = s
        s = s_rest + torch.exp(g - m).sum(1)
    lse = m.squeeze(1) + s.log()

    rows = z.new_zeros(z.shape[0])
    if use_ce:
        ce = lse - z_t if eps == 0 else lse - (1.0 - eps) * z_t - (eps / V) * sum_z
        rows = rows + w_ce * ce
    if use_kl:
        entropy = torch.xlogy(probs, probs).sum(1)
        if other_bucket:
            pk, p_other = probs[:, :-1], probs[:, -1]
            logq_ids = g - lse.unsqueeze(1)
            log_other_raw = s_rest.log() - s.log()
            log_other = log_other_raw.clamp(min=LOG_TINY)
            kl = entropy - (pk * logq_ids).sum(1) - p_other * log_other
        else:
            logr = torch.log_softmax(g, dim=1)
            kl = entropy - (probs * logr).sum(1)
        rows = rows + w_kl * kl
    if grad_scale is None:
        return rows, None

    # dKL/dz and dCE/dz (derivation: tests check them against autograd):
    #   CE:            q - (1 - eps) onehot(t) - eps / V
    #   KL, no bucket: at the ids only, P * softmax(g) - p           (P = sum p, 1 unless padding)
    #   KL, bucket:    P * q - p at the ids, (P - p_other / q_other) * q on the rest
    # The buffer holds exp(z - m) = q * s, so every "q on the buffer" term is one row scale.
    scale = z.new_full((z.shape[0],), w_ce if use_ce else 0.0)
    if use_kl:
        P = probs.sum(1)
        if other_bucket:
            q_ids = torch.exp(logq_ids)
            # p_other / q_other, dropped where the rest log-mass hit its floor (no gradient there).
            ratio = torch.where(log_other_raw < LOG_TINY, torch.zeros_like(P), p_other * torch.exp(-log_other_raw))
            scale = scale + w_kl * (P - ratio)
            ids_vals = w_kl * (P.unsqueeze(1) * q_ids - pk)
            if use_ce:
                ids_vals = ids_vals + w_ce * q_ids  # the buffer is 0 at the masked ids
        else:
            ids_vals = w_kl * (P.unsqueeze(1) * torch.softmax(g, dim=1) - probs)
    z.mul_((scale * grad_scale / s).unsqueeze(1))
    if use_ce and eps > 0:
        z.sub_(grad_scale * w_ce * eps / V)
    if use_kl:
        z.scatter_add_(1, ids, ids_vals * grad_scale)
    if use_ce:
        z.scatter_add_(1, targets.unsqueeze(1), z.new_full((z.shape[0], 1), -grad_scale * w_ce * (1.0 - eps)))
    return rows, z


def _autograd_chunk(z, targets, ids, probs, alpha, eps, other_bucket, grad_scale, norm: StudentNorm):
    """`_dense_chunk` for the student normalisations without a closed-form gradient here
    ("prob-softmax", "linear"): the chunk's rows come from the same pure functions as
    `distillation_loss` and d(loss)/d(logits) from autograd on the chunk alone, so the memory bound
    (a few [c, V] buffers) and chunked == unchunked both hold by construction."""
    use_ce, use_kl = targets is not None, ids is not None
    z = z.detach().requires_grad_(grad_scale is not None)
    with torch.enable_grad():
        rows = z.new_zeros(z.shape[0])
        if use_kl:
            rows = rows + ((1.0 - alpha) if use_ce else 1.0) * _kl_rows(z, ids, probs, other_bucket, norm)
        if use_ce:
            rows = rows + (alpha if use_kl else 1.0) * _ce_rows(z, targets, eps)
        if grad_scale is None:
            return rows.detach(), None
        (dz,) = torch.autograd.grad(rows.sum() * grad_scale, z)
    return rows.detach(), dz


def _run_chunks(hidden, weight, bias, targets, ids, probs, row_scale, alpha, eps, other_bucket, norm,
                chunk_size, need_h, need_w, need_b):
    """Loss (fp32 scalar) and its gradients w.r.t. hidden [N, H], weight [V, H], bias [V].

    hidden [N, H] / weight [V, H] / bias [V] share the compute dtype; only counted rows are passed.
    row_scale: the reduction's per-row weight, a float (1 / N for mean, 1 for sum).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    math_dtype = torch.promote_types(hidden.dtype, torch.float32)
    wide = hidden.dtype == math_dtype  # no low-precision copies needed
    loss = hidden.new_zeros((), dtype=math_dtype)
    grad_h = torch.empty_like(hidden) if need_h else None
    # fp32 accumulators: summing many low-precision chunk gradients in bf16 would lose bits.
    grad_w = weight.new_zeros(weight.shape, dtype=math_dtype) if need_w else None
    grad_b = weight.new_zeros((V,), dtype=math_dtype) if need_b else None
    want_grad = need_h or need_w or need_b
    sparse = ids is not None and targets is None and not other_bucket and norm.kind == "logit"
    chunk_fn = _dense_chunk if norm.kind == "logit" else functools.partial(_autograd_chunk, norm=norm)
    for start in range(0, N, chunk_size):
        sl = slice(start, min(start + chunk_size, N))
        h = hidden[sl]
        t = targets[sl] if targets is not None else None
        if sparse:
            # Only the k logits at the teacher ids enter the loss: evaluate the head there alone.
            k = ids.shape[1]
            safe_ids, pad = _pad_columns(ids[sl])  # padding: no logit, a gradient of exactly 0
            flat_ids = safe_ids.reshape(-1)
            w_ids = weight.index_select(0, flat_ids).view(-1, k, H)  # [c, k, H]
            g = torch.bmm(w_ids, h.unsqueeze(2)).squeeze(2)
            if bias is not None:
                g = g + bias.index_select(0, flat_ids).view(-1, k)
            g = g.to(math_dtype).masked_fill(pad, torch.finfo(math_dtype).min)
            p = probs[sl].to(math_dtype)
            logr = torch.log_softmax(g, dim=1)
            rows = torch.xlogy(p, p).sum(1) - (p * logr).sum(1)
            loss += rows.sum() * row_scale
            if not want_grad:
                continue
            dg = (p.sum(1, keepdim=True) * logr.exp() - p) * row_scale  # [c, k] fp32
            if need_h:
                grad_h[sl] = torch.bmm(dg.to(hidden.dtype).unsqueeze(1), w_ids).squeeze(1)
            if need_w:
                grad_w.index_add_(0, flat_ids, (dg.unsqueeze(2) * h.to(math_dtype).unsqueeze(1)).reshape(-1, H))
            if need_b:
                grad_b.index_add_(0, flat_ids, dg.reshape(-1))
            continue

        z = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
        z = z.to(math_dtype)  # a no-op for fp32, so the in-place work below reuses the matmul's buffer
        rows, dz = chunk_fn(
            z, t, ids[sl] if ids is not None else None, probs[sl] if probs is not None else None,
            alpha, eps, other_bucket, row_scale if want_grad else None,
        )
        loss += rows.sum() * row_scale
        if not want_grad:
            continue
        dz_c = dz if wide else dz.to(hidden.dtype)
        if need_h:
            torch.mm(dz_c, weight, out=grad_h[sl])
        if need_w:
            if wide:
                grad_w.addmm_(dz_c.t(), h)
            else:
                grad_w.add_(torch.mm(dz_c.t(), h).to(math_dtype))
        if need_b:
            grad_b.add_(dz.sum(0))
    return loss, grad_h, grad_w, grad_b


def _scaled_saved_grads(ctx, grad_out: torch.Tensor) -> tuple:
    """The (hidden, weight, bias) gradients a chunked loss computed in forward, times the upstream gradient, in
    the inputs' dtypes. Out of place, so a second backward (retain_graph) sees the unscaled gradients again."""
    return tuple((g * grad_out).to(dtype) if g is not None else None
                 for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Loss of hidden @ weight.T (+ bias) with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ids, probs, row_scale, alpha, eps, other_bucket, norm,
                chunk_size, need_h, need_w, need_b):
        loss, grad_h, grad_w, grad_b = _run_chunks(
            hidden, weight, bias, targets, ids, probs, row_scale, alpha, eps, other_bucket, norm, chunk_size,
            need_h, need_w, need_b,
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _scaled_saved_grads(ctx, grad_out) + (None,) * 12


def chunked_distillation_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: Optional[torch.Tensor],
    teacher_ids: Optional[torch.Tensor] = None,
    teacher_probs: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    other_bucket: bool = False,
    label_smoothing: float = 0.0,
    chunk_size: int = 1024,
    reduction: str = "mean",
    head_bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    student_norm: StudentNorm = LOGIT_NORM,
) -> torch.Tensor:
    """`distillation_loss(hidden @ head_weight.T + head_bias, ...)` without materialising [N, V].

    Args:
        hidden: [N, H] (or [..., H]) final hidden states, e.g. ``model.model(...).last_hidden_state``
            at the target positions; grad flows into it when it requires grad.
        head_weight: [V, H] output embedding (``model.lm_head.weight``; may be tied to the input
            embedding, autograd accumulates both uses).
        targets: [N] long next-token ids (-100 = ignored), or None when no CE term is needed.
        teacher_ids, teacher_probs, alpha, other_bucket, label_smoothing, mask, ignore_index, student_norm:
            as in `distillation_loss`.
        chunk_size: rows per chunk; peak extra memory is about 2 * chunk_size * V fp32 values.
        reduction: "mean" or "sum" ("none" is not offered: per-row losses would need the head's
            gradient per row; use `distillation_loss` on logits for that).
        head_bias: [V] or None.

    Returns:
        fp32 scalar. Differentiable w.r.t. hidden, head_weight and head_bias (once; no double grad).
    """
    _check_options(alpha, label_smoothing, reduction)
    if reduction == "none":
        raise ValueError("chunked_distillation_loss supports reduction 'mean' or 'sum'; "
                         "use distillation_loss on logits for per-row losses")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    H = hidden.shape[-1]
    if head_weight.dim() != 2 or head_weight.shape[1] != H:
        raise ValueError(f"head_weight must be [V, {H}] to match hidden, got {tuple(head_weight.shape)}")
    V = head_weight.shape[0]
    if head_bias is not None and head_bias.shape != (V,):
        raise ValueError(f"head_bias must be [{V}], got {tuple(head_bias.shape)}")
    h = hidden.reshape(-1, H)
    N = h.shape[0]
    ids, probs, use_kl, use_ce = _loss_terms(teacher_ids, teacher_probs, targets, N, alpha, other_bucket, "hidden")

    valid = target_mask(targets, mask, N, ignore_index).to(h.device)
    keep = valid.nonzero().squeeze(1)
    n_valid = int(keep.numel())
    t = targets.reshape(-1).long() if use_ce else None
    if n_valid < N:  # drop ignored rows up front: no work and no garbage from them
        h = h.index_select(0, keep)
        t = t.index_select(0, keep) if t is not None else None
        ids = ids.index_select(0, keep) if ids is not None else None
        probs = probs.index_select(0, keep) if probs is not None else None
    if not use_kl:
        ids = probs = None
    if ids is not None:
        _check_ids(ids, V, probs)
    if t is not None:
        _check_targets(t, V)
    row_scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0

    # One compute dtype for the matmuls (the wider of the two), outside any autocast region, so the
    # chunked and unchunked losses see the same logits.
    dtype = torch.promote_types(h.dtype, head_weight.dtype)
    w = head_weight.to(dtype)
    b = head_bias.to(dtype) if head_bias is not None else None
    h = h.to(dtype).contiguous()  # chunk gradients are written into row slices of a like-shaped buffer
    need_h = torch.is_grad_enabled() and h.requires_grad
    need_w = torch.is_grad_enabled() and w.requires_grad
    need_b = torch.is_grad_enabled() and b is not None and b.requires_grad
    with torch.autocast(device_type=h.device.type, enabled=False):
        if not (need_h or need_w or need_b):
            with torch.no_grad():
                return _run_chunks(h, w, b, t, ids, probs, row_scale, alpha, label_smoothing,
                                   other_bucket, student_norm, chunk_size, False, False, False)[0]
        return _ChunkedHeadLoss.apply(h, w, b, t, ids, probs, row_scale, alpha, label_smoothing,
                                      other_bucket, student_norm, chunk_size, need_h, need_w, need_b)


# ---------------------------------------------------------------------------------------------------
# Sampled caches (RS-KD): importance-weighted cross-entropy / KL over sampled ids
# ---------------------------------------------------------------------------------------------------

ESTIMATORS = ("unbiased", "self-normalised")
OBJECTIVES = ("ce", "kl")


def sample_weights(counts: torch.Tensor, target_logprobs: torch.Tensor, proposal_logprobs: torch.Tensor,
                   estimator: str = "unbiased") -> torch.Tensor:
    """Each sampled id's weight in the estimate: [N, m] in the math dtype (fp32, or float64).

    Args:
        counts: [N, m] draws of each id (0 = padding; a row sums to n >= 1).
        target_logprobs: [N, m] log p(id) of the target: normalised for "unbiased"; for
            "self-normalised" any per-row constant may be missing (log p~ = log p + const).
        proposal_logprobs: [N, m] log q(id) of the proposal the draws came from.
        estimator: "unbiased": w = c * p / q / n, whose row sum is an unbiased estimate of 1 (exactly
            c / n when target == proposal); "self-normalised": w = c * p~ / q / sum(c * p~ / q), summing to 1.
    Padding slots (count 0) get weight 0 whatever their log-probs hold.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}: use one of {ESTIMATORS}")
    dtype = torch.promote_types(torch.promote_types(target_logprobs.dtype, proposal_logprobs.dtype), torch.float32)
    real = counts > 0
    log_ratio = (target_logprobs.to(dtype) - proposal_logprobs.to(dtype)).masked_fill(~real, float("-inf"))
    c = counts.to(dtype)
    if estimator == "unbiased":
        n = c.sum(dim=-1, keepdim=True)
        return torch.where(real, c * log_ratio.exp(), torch.zeros_like(c)) / n.clamp(min=1)
    top = log_ratio.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row of target zeros stays 0
    w = c * (log_ratio - top).exp()
    return w / w.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)


def sampled_log_normaliser(counts: torch.Tensor, target_logprobs: torch.Tensor,
                           proposal_logprobs: torch.Tensor) -> torch.Tensor:
    """log Z^ per row [N], Z^ = (1/n) sum_i c_i p~(x_i) / q(x_i): an unbiased estimate of the target's
    normaliser Z = sum_v p~(v) (exact in expectation; its log is only consistent, E[log Z^] <= log Z).
    Inputs as in `sample_weights` (target_logprobs unnormalised, log p~)."""
    dtype = torch.promote_types(torch.promote_types(target_logprobs.dtype, proposal_logprobs.dtype), torch.float32)
    real = counts > 0
    log_ratio = (target_logprobs.to(dtype) - proposal_logprobs.to(dtype)).masked_fill(~real, float("-inf"))
    logc = counts.to(dtype).clamp(min=1).log()
    n = counts.to(dtype).sum(dim=-1).clamp(min=1)
    return torch.logsumexp(log_ratio + logc, dim=-1) - n.log()


def _sampled_terms(counts, target_logprobs, proposal_logprobs, objective, estimator, target_entropy, valid):
    """Weights [N, m] and each row's z-free term [N] (0 for CE; the entropy part of KL), 0 at ignored rows."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")
    keep = valid.unsqueeze(1)
    counts = counts.masked_fill(~keep, 0)
    lt, lq = target_logprobs.masked_fill(~keep, 0.0), proposal_logprobs.masked_fill(~keep, 0.0)
    w = sample_weights(counts, lt, lq, estimator)
    offset = w.new_zeros(w.shape[0])
    if objective == "kl":
        if target_entropy is not None:
            offset = -_upcast(target_entropy.reshape(-1)).to(w.dtype)
        else:
            # sum_i w_i log p(x_i): the sampled estimate of -H(p); w = 0 where p = 0 (xlogy convention).
            offset = torch.where(w > 0, w * lt.to(w.dtype), torch.zeros_like(w)).sum(-1)
            if estimator == "self-normalised":
                offset = offset - sampled_log_normaliser(counts, lt, lq)
        offset = torch.where(valid, offset, torch.zeros_like(offset))
    return w, offset


def _check_samples(ids, counts, target_logprobs, proposal_logprobs, n_rows: int, what: str):
    """Flatten the sampled tensors to [N, m] and check that they agree; returns (ids, counts, lt, lq)."""
    if ids.is_floating_point() or counts.is_floating_point():
        raise ValueError(f"sample_ids and sample_counts must be integers, got {ids.dtype} and {counts.dtype}")
    m = ids.shape[-1]
    flat = [t.reshape(-1, t.shape[-1]) for t in (ids, counts, target_logprobs, proposal_logprobs)]
    if any(t.shape != (n_rows, m) for t in flat):
        raise ValueError(
            f"sampled tensors do not match {what} ({n_rows} rows): sample_ids {tuple(ids.shape)}, sample_counts "
            f"{tuple(counts.shape)}, target_logprobs {tuple(target_logprobs.shape)}, proposal_logprobs "
            f"{tuple(proposal_logprobs.shape)}; all must be [{n_rows}, m]")
    return flat[0].long(), flat[1], flat[2], flat[3]


def _check_sampled_rows(ids: torch.Tensor, counts: torch.Tensor, vocab_size: int) -> None:
    """Counted rows: counts >= 0 summing to >= 1, sampled ids (count > 0) in the vocabulary."""
    if counts.numel() == 0:
        return
    if int(counts.min()) < 0:
        raise ValueError("sample_counts must be >= 0 (0 marks padding)")
    if bool((counts.sum(-1) < 1).any()):
        raise ValueError("a counted row has no samples (its counts sum to 0): mask it out (mask=False)")
    real = ids[counts > 0]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise ValueError(f"sample_ids out of range [0, {vocab_size}): the teacher cache and student must share a "
                         "vocabulary")


def _prepare_sampled(sample_ids, sample_counts, target_logprobs, proposal_logprobs, objective, estimator,
                     target_entropy, valid, vocab_size, what):
    """Everything but the student: ids [N, m] (padding and ignored rows -> 0), weights [N, m], z-free rows [N]."""
    n_rows = valid.shape[0]
    ids, counts, lt, lq = _check_samples(sample_ids, sample_counts, target_logprobs, proposal_logprobs, n_rows, what)
    if target_entropy is not None and target_entropy.numel() != n_rows:
        raise ValueError(f"target_entropy has {target_entropy.numel()} rows but {what} {n_rows}")
    _check_sampled_rows(ids[valid], counts[valid], vocab_size)
    w, offset = _sampled_terms(counts, lt, lq, objective, estimator, target_entropy, valid)
    ids = ids.masked_fill(~valid.unsqueeze(1) | (counts <= 0), 0)
    return ids, w, offset


def sampled_kd_loss(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    target_logprobs: torch.Tensor,
    proposal_logprobs: torch.Tensor,
    objective: str = "kl",
    estimator: str = "unbiased",
    target_entropy: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-entropy or KL(target || student) over the full vocabulary, estimated from a sampled cache.

    Per row, with draws x_i ~ q (n in all, id x_i drawn c_i times), target p and the student's
    full-vocabulary softmax s:

        CE^ = sum_i w_i * (-log s(x_i)),   KL^ = CE^ - H,   w_i = c_i p(x_i) / (n q(x_i))   ("unbiased")

    E_q[CE^] = CE(p, s) = -sum_v p(v) log s(v) exactly, and E_q[grad_z CE^] = s - p, the full-distillation
    gradient (the gradient is (sum_i w_i) s - w at the ids, linear in w). H is `target_entropy` when
    given (exact, e.g. computed where the full distribution was seen), else the same samples' estimate
    -sum_i w_i log p(x_i), also unbiased: KL^ = sum_i w_i log(p(x_i) / s(x_i)), whose rows can be < 0.
    When the target is the proposal (sampled at the target's own temperature) every p / q is exactly
    1 and CE^ is the count-weighted CE (1/n) sum_i c_i (-log s(x_i)).

    "self-normalised" takes an unnormalised target log p~ (its normaliser unknown) and weights
    w_i = c_i p~/q / sum_j c_j p~/q; in KL, log p(x_i) is log p~(x_i) - log Z^ (`sampled_log_normaliser`).
    It is consistent, not unbiased: its bias is O(1/n) once n is large against 1 / p of the ids that
    carry the weight (tests measure n * bias settling); below that it need not even shrink with n.

    Args:
        student_logits: [N, V] (or [..., V]) student logits, any float dtype (math in fp32 or float64).
        sample_ids: [N, m] int sampled ids (first_kd.engines.sampling.SampledRows.ids; padding anywhere).
        sample_counts: [N, m] int draws per id, 0 = padding; counted rows sum to n >= 1.
        target_logprobs: [N, m] log p(id) of the target (first_kd.temperature builds them per id).
        proposal_logprobs: [N, m] log q(id) of the distribution the draws came from.
        objective: "kl" (default) or "ce"; they differ by a constant, so their gradients are equal.
        estimator: "unbiased" or "self-normalised" (see above).
        target_entropy: [N] H(p) per row for "kl", or None to estimate it from the samples.
        reduction: "mean" over counted rows, "sum", or "none" ([...] per row, 0 at ignored rows).
        mask: [N] bool, False for rows to ignore (they may hold garbage: no samples, NaN log-probs).

    Returns:
        a scalar in the math dtype, or per-row losses for "none".
    """
    _check_options(0.0, 0.0, reduction)
    lead_shape = student_logits.shape[:-1]
    V = student_logits.shape[-1]
    z = _upcast(student_logits.reshape(-1, V))
    valid = target_mask(None, mask, z.shape[0]).to(z.device)
    if valid.shape[0] != z.shape[0]:
        raise ValueError(f"mask has {valid.shape[0]} rows but the logits {z.shape[0]}")
    lt, lq = (t.to(torch.promote_types(t.dtype, z.dtype)) for t in (target_logprobs, proposal_logprobs))
    ids, w, offset = _prepare_sampled(sample_ids, sample_counts, lt, lq, objective, estimator, target_entropy,
                                      valid, V, "the logits")
    w = w.to(z.dtype)
    neg_logs = torch.logsumexp(z, dim=-1, keepdim=True) - z.gather(1, ids)
    rows = (w * neg_logs).sum(-1) + offset.to(z.dtype)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return _reduce(rows, valid, reduction, lead_shape)


def _sampled_chunks(hidden, weight, bias, ids, w, row_scale, chunk_size, need_h, need_w, need_b):
    """sum_rows row_scale * sum_i w_i (lse - z_{x_i}) of z = hidden @ weight.T (+ bias), chunk by chunk,
    with its gradients w.r.t. hidden [N, H], weight [V, H], bias [V] (closed form: dz = (sum w) s - w at ids)."""
    math_dtype = torch.promote_types(hidden.dtype, torch.float32)
    wide = hidden.dtype == math_dtype
    loss = hidden.new_zeros((), dtype=math_dtype)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = weight.new_zeros(weight.shape, dtype=math_dtype) if need_w else None
    grad_b = weight.new_zeros((weight.shape[0],), dtype=math_dtype) if need_b else None
    want_grad = need_h or need_w or need_b
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, min(start + chunk_size, hidden.shape[0]))
        h, wc, ic = hidden[sl], w[sl].to(math_dtype), ids[sl]
        z = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
        z = z.to(math_dtype)
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        loss += (wc * (lse - z.gather(1, ic))).sum() * row_scale
        if not want_grad:
            continue
        dz = z.sub_(lse).exp_().mul_(wc.sum(1, keepdim=True) * row_scale)  # in place: (sum w) * softmax
        dz.scatter_add_(1, ic, -wc * row_scale)
        dz_c = dz if wide else dz.to(hidden.dtype)
        if need_h:
            torch.mm(dz_c, weight, out=grad_h[sl])
        if need_w:
            if wide:
                grad_w.addmm_(dz_c.t(), h)
            else:
                grad_w.add_(torch.mm(dz_c.t(), h).to(math_dtype))
        if need_b:
            grad_b.add_(dz.sum(0))
    return loss, grad_h, grad_w, grad_b


class _ChunkedSampledLoss(torch.autograd.Function):
    """`_sampled_chunks` as an autograd function: gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, w, row_scale, chunk_size, need_h, need_w, need_b):
        loss, grad_h, grad_w, grad_b = _sampled_chunks(hidden, weight, bias, ids, w, row_scale, chunk_size,
                                                       need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _scaled_saved_grads(ctx, grad_out) + (None,) * 7


def chunked_sampled_kd_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    target_logprobs: torch.Tensor,
    proposal_logprobs: torch.Tensor,
    objective: str = "kl",
    estimator: str = "unbiased",
    target_entropy: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    reduction: str = "mean",
    head_bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`sampled_kd_loss(hidden @ head_weight.T + head_bias, ...)` without materialising [N, V].

    Args:
        hidden: [N, H] (or [..., H]) final hidden states at the target positions.
        head_weight: [V, H] output embedding; head_bias: [V] or None.
        sample_ids, sample_counts, target_logprobs, proposal_logprobs, objective, estimator, target_entropy,
            mask: as in `sampled_kd_loss`.
        chunk_size: rows per chunk; peak extra memory is about 2 * chunk_size * V values of the math dtype.
        reduction: "mean" or "sum".

    Returns:
        a scalar in the math dtype, differentiable (once) w.r.t. hidden, head_weight and head_bias.
    """
    _check_options(0.0, 0.0, reduction)
    if reduction == "none":
        raise ValueError("chunked_sampled_kd_loss supports reduction 'mean' or 'sum'; "
                         "use sampled_kd_loss on logits for per-row losses")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    H = hidden.shape[-1]
    if head_weight.dim() != 2 or head_weight.shape[1] != H:
        raise ValueError(f"head_weight must be [V, {H}] to match hidden, got {tuple(head_weight.shape)}")
    V = head_weight.shape[0]
    if head_bias is not None and head_bias.shape != (V,):
        raise ValueError(f"head_bias must be [{V}], got {tuple(head_bias.shape)}")
    h = hidden.reshape(-1, H)
    valid = target_mask(None, mask, h.shape[0]).to(h.device)
    if valid.shape[0] != h.shape[0]:
        raise ValueError(f"mask has {valid.shape[0]} rows but hidden {h.shape[0]}")
    math = torch.promote_types(torch.promote_types(h.dtype, head_weight.dtype), torch.float32)
    lt, lq = (t.to(torch.promote_types(t.dtype, math)) for t in (target_logprobs, proposal_logprobs))
    ids, w, offset = _prepare_sampled(sample_ids, sample_counts, lt, lq, objective, estimator, target_entropy,
                                      valid, V, "hidden")
    keep = valid.nonzero().squeeze(1)
    n_valid = int(keep.numel())
    h, ids, w = h.index_select(0, keep), ids.index_select(0, keep), w.index_select(0, keep)
    row_scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
    dtype = torch.promote_types(h.dtype, head_weight.dtype)
    wt = head_weight.to(dtype)
    b = head_bias.to(dtype) if head_bias is not None else None
    h = h.to(dtype).contiguous()
    need_h = torch.is_grad_enabled() and h.requires_grad
    need_w = torch.is_grad_enabled() and wt.requires_grad
    need_b = torch.is_grad_enabled() and b is not None and b.requires_grad
    with torch.autocast(device_type=h.device.type, enabled=False):
        if not (need_h or need_w or need_b):
            with torch.no_grad():
                loss = _sampled_chunks(h, wt, b, ids, w, row_scale, chunk_size, False, False, False)[0]
        else:
            loss = _ChunkedSampledLoss.apply(h, wt, b, ids, w, row_scale, chunk_size, need_h, need_w, need_b)
    return loss + offset.sum().to(loss.dtype) * row_scale
