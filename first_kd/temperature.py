"""The teacher's top-k distribution after temperature: the one place this math lives.

Variable-k rows (top-p caches, batches of rows of different k): a batch is padded to [..., k_max], the
real columns of a row first, then padding columns holding id -1 (any negative id) and log-prob -inf.
Column 0 of a counted row is always real. Every function here gives a padding column probability
exactly 0 and computes a padded row exactly as it would the row's real columns alone (k = its count);
the other bucket stays the last column (index k_max). Only the log-probs reach the functions that do
not take ids, so there a -inf log-prob marks a padding column.

The store keeps raw top-k log-probabilities (temperature 1, full-vocabulary softmax). Every
consumer (the reader, the losses, calibration fitting, evaluation) turns them into a distribution
with `teacher_distribution`, so re-calibrating never re-runs the teacher.

Forms:
  * ``None`` / "none": no temperature. The k probabilities renormalised over the k ids.
  * "logit": standard temperature scaling, softmax(logprob / T) over the k ids.
  * "prob": the FIRST paper's form, softmax(p / c) over the k *probabilities* p = exp(logprob).
    c in (0, 1] sharpens relative to c = 1; note that even c = 1 flattens the raw top-k, because
    softmax acts on probabilities in [0, 1], not on logits.

With ``other_bucket=True`` a (k+1)-th category holds the mass outside the top-k, 1 - sum(p), and the
temperature reshapes the top-k only: the target is [(1 - rest) * tempered top-k, rest]. The rest keeps
the teacher's own mass because the tail's shape is not cached (it cannot be rescaled token by token)
and because the temperature is fitted on the renormalised top-k (first_kd.calibration); so a student
trained on it puts as much full-vocabulary mass on the teacher's top-k as the teacher does.

Teacher-side normalisations (`teacher_target`, the `distill --teacher-norm` choices, after the FIRST
authors' `--use_norm`): "auto" follows the store's temperature record (the forms above); "logit" and
"prob-softmax" force one form (its temperature taken from a record of that form, else 1); "linear" is
(p + eps) / sum(p + eps), no temperature. `smoothing` is the paper's "Distill w/ LS" baseline: a fraction
of the top-1 probability is spread evenly over the other k - 1 ids.

Sampled caches (RS-KD: n draws per position from a proposal q, first_kd.engines.sampling): the loss
(first_kd.losses.sampled_kd_loss) needs the target's log-prob at each *sampled* id, which for a
full-vocabulary target needs its normaliser. What is exact, and what only consistent:
  * The target `distill --loss first` trains on, extended to the vocabulary ("the bucket target"):
    p_t(v) = (1 - rest) * tempered top-k(v) on the top-k ids, and the teacher's own p(v) on every other
    id (its tail keeps its mass, as the bucket does, and now its shape). Its normaliser is the top-k's,
    so `sampled_target_logprobs` gives p_t at any sampled id *exactly* from the position's top-k alone,
    for both forms and any value fitted after the cache was written (the fit reads a top-k store, as
    today). The estimate of CE / KL / the gradient is then exactly unbiased. This is the route for
    sampled caches: cache the top-k as now plus n draws from the teacher at temperature 1 (the
    paper's proposal); every tail draw has weight 1 and a top-k draw p_t / p.
  * Full-vocabulary temperature scaling p_T(v) = p(v)^(1/T) / Z_T ("logit" form over V): exact only
    when T is known when the cache is written: sample with proposal = p_T (`sample_rows(...,
    proposal_temperature=T)`; every weight is 1, the loss is the count-weighted CE), or record
    log Z_T (`full_log_normaliser`) and use `full_tempered_logprobs`. For a T fitted afterwards, Z_T
    (a sum over V) is not in the cache: pass log p(x)/T as an unnormalised target to the
    "self-normalised" estimator; its Z^ is unbiased but CE / KL are only consistent, bias O(1/n), and
    with a temperature-1 proposal and T > 1 its variance grows with the tail's size.
  * The "prob" form over the full vocabulary, softmax(p / c) over V, is not offered: every tail token
    gets exp(~0) = 1, so with V = 32,000 and c = 0.5 a top-1 of p = 0.9 keeps e^1.8 / ~32,000 = 2e-4 of
    the mass. FIRST's prob form exists on the top-k; sampled caches use it through the bucket target.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

FORMS = ("logit", "prob")


def padding_columns(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[..., k] bool, True at the padding columns of cached log-probs (-inf, see the module docstring)."""
    return torch.isneginf(topk_logprobs)


def other_mass_logprob(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_k p_k) for [..., k] log-probs -> [...]; -inf when the top-k holds all the mass.
    Padding columns (-inf) hold no mass, so they need no mask."""
    total = torch.logsumexp(topk_logprobs.float(), dim=-1)
    # log1p(-exp(x)) is the stable form of log(1 - exp(x)) for x <= 0; clamp absorbs rounding above 0.
    return torch.log1p(-torch.exp(total.clamp(max=0.0)).clamp(max=1.0))


def teacher_distribution(
    topk_logprobs: torch.Tensor,
    form: Optional[str] = None,
    value: float = 1.0,
    other_bucket: bool = False,
) -> torch.Tensor:
    """Teacher target distribution from cached top-k log-probs.

    Args:
        topk_logprobs: [..., k] log-probabilities of the top-k ids (any float dtype; computed in fp32).
        form: None (no temperature), "logit" or "prob" (see module docstring).
        value: T for "logit", c for "prob"; must be > 0.
        other_bucket: append a (k+1)-th category with the remaining mass instead of renormalising.

    Returns:
        [..., k] (or [..., k+1] with other_bucket) fp32 probabilities summing to 1 on the last axis.
    """
    if form in (None, "none"):
        form, value = "logit", 1.0
    if form not in FORMS:
        raise ValueError(f"unknown temperature form {form!r}: use one of {FORMS} or None")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"temperature must be a finite number > 0, got {value}")
    logp = topk_logprobs.float()
    if form == "logit":
        scores = logp / value  # a padding column stays -inf
    else:  # exp(-inf) / c = 0 would weigh a padding column e^0 = 1: mask it
        scores = (torch.exp(logp) / value).masked_fill(padding_columns(logp), float("-inf"))
    tempered = torch.softmax(scores, dim=-1)
    return _with_rest(tempered, logp) if other_bucket else tempered


def _with_rest(topk_probs: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[..., k] probabilities summing to 1 -> [..., k+1]: scaled to the top-k's own mass, the rest last."""
    rest = torch.exp(other_mass_logprob(topk_logprobs))
    return torch.cat([topk_probs * (1.0 - rest).unsqueeze(-1), rest.unsqueeze(-1)], dim=-1)


TEACHER_NORMS = ("auto", "logit", "prob-softmax", "linear")
_FORM_OF_NORM = {"logit": "logit", "prob-softmax": "prob"}


def smooth_top1(probs: torch.Tensor, smoothing: float, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Label smoothing of a top-k distribution [..., k] (FIRST's "Distill w/ LS" baseline): a fraction
    `smoothing` of the largest probability is taken off it and spread evenly over the other k - 1.

    pad: [..., k] bool, True at padding columns (probability 0; None = none): a row is smoothed over its
    real columns only (count - 1 of them), and a row with one real column is left as it is."""
    k = probs.shape[-1]
    if smoothing == 0.0 or k < 2:
        return probs
    top = probs.argmax(dim=-1, keepdim=True)
    top_p = probs.gather(-1, top)
    if pad is None:
        moved = top_p * smoothing
        return (probs + moved / (k - 1)).scatter(-1, top, top_p - moved)
    real = (~pad).to(probs.dtype)
    others = real.sum(dim=-1, keepdim=True) - 1.0
    moved = torch.where(others > 0, top_p * smoothing, torch.zeros_like(top_p))
    out = probs + (moved / others.clamp(min=1.0)) * real
    return out.scatter(-1, top, top_p - moved)


def teacher_target(topk_logprobs: torch.Tensor, record: Optional[dict], other_bucket: bool = False,
                   norm: str = "auto", eps: float = 1e-6, smoothing: float = 0.0) -> torch.Tensor:
    """The distribution a student learns: [..., k] (or [..., k+1] with the other bucket) fp32.

    Args:
        topk_logprobs: [..., k] cached log-probs; record: the store's temperature record ({} / None = none).
        norm: "auto" (the record's form), "logit", "prob-softmax" or "linear" (see the module docstring).
        eps: the shift of "linear"; smoothing: the LS fraction of the top-1 probability, in [0, 1).
    Raises ValueError when `norm` forces a form other than the record's (the fitted value would not apply).
    """
    if norm not in TEACHER_NORMS:
        raise ValueError(f"unknown teacher normalisation {norm!r}: use one of {TEACHER_NORMS}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    form, value = (record["form"], float(record["value"])) if record else (None, 1.0)
    logp = topk_logprobs.float()
    pad = padding_columns(logp)
    if norm == "linear":
        shifted = (torch.exp(logp) + eps).masked_fill(pad, 0.0)
        probs = shifted / shifted.sum(dim=-1, keepdim=True)
    else:
        if norm != "auto":
            if form is not None and form != _FORM_OF_NORM[norm]:
                raise ValueError(f"the store's temperature is of the {form} form, which --teacher-norm {norm} "
                                 "cannot apply: use --teacher-norm auto, or calibrate with the matching --form")
            form = _FORM_OF_NORM[norm]
        probs = teacher_distribution(logp, form, value)
    probs = smooth_top1(probs, smoothing, pad)
    return _with_rest(probs, logp) if other_bucket else probs


def distribution_from_record(
    topk_logprobs: torch.Tensor, record: Optional[dict], other_bucket: bool = False
) -> torch.Tensor:
    """`teacher_distribution` with the temperature taken from a store's `temperature` record
    ({} or None means no temperature)."""
    return teacher_target(topk_logprobs, record, other_bucket)


def describe(record: Optional[dict]) -> str:
    """The one way a temperature record is named to people: "raw" (none), "prob c=0.4", "logit T=1.37"."""
    if not record:
        return "raw"
    symbol = "c" if record.get("form") == "prob" else "T"
    return f"{record.get('form')} {symbol}={float(record.get('value')):.4g}"


# ---------------------------------------------------------------------------------------------------
# Sampled caches: the target's log-probability at each sampled id (see the module docstring)
# ---------------------------------------------------------------------------------------------------


def sampled_target_logprobs(sample_ids: torch.Tensor, sample_logprobs: torch.Tensor, topk_ids: torch.Tensor,
                            topk_logprobs: torch.Tensor, topk_target: torch.Tensor) -> torch.Tensor:
    """log p_t at each sampled id for the bucket target: exact, from the position's top-k alone.

    Args:
        sample_ids: [..., m] sampled ids (padding slots may hold anything; their value is meaningless).
        sample_logprobs: [..., m] the teacher's full-vocabulary log-probs (temperature 1) at those ids.
        topk_ids: [..., k] the position's top-k ids (distinct; -1 at padding columns, which never match a
            sampled id); topk_logprobs: [..., k] their raw log-probs (-inf at padding).
        topk_target: [..., k+1] the top-k target with the other bucket last, e.g.
            ``teacher_target(topk_logprobs, record, other_bucket=True)`` (any form, value, norm, smoothing).
    Returns:
        [..., m] (fp32, or float64 inputs' dtype): log topk_target at an id in the top-k; elsewhere the
        teacher's own log p(id) scaled by target rest / teacher rest (the ratio is 1 for `teacher_target`,
        whose bucket keeps the teacher's rest), so the tail keeps the teacher's shape. Summed over the
        whole vocabulary the result is sum(topk_target) = 1.
    """
    dtype = torch.promote_types(torch.promote_types(sample_logprobs.dtype, topk_target.dtype), torch.float32)
    hit = (sample_ids.unsqueeze(-1) == topk_ids.unsqueeze(-2)) & (topk_ids >= 0).unsqueeze(-2)  # [..., m, k]
    col = hit.long().argmax(dim=-1)
    head = torch.log(topk_target[..., :-1].to(dtype)).gather(-1, col)
    log_rest_teacher = other_mass_logprob(topk_logprobs).to(dtype)
    scale = torch.log(topk_target[..., -1].to(dtype)) - log_rest_teacher
    # A top-k holding all the mass leaves no tail to draw from; keep such (impossible) draws finite.
    scale = torch.where(torch.isfinite(log_rest_teacher), scale, torch.zeros_like(scale))
    tail = sample_logprobs.to(dtype) + scale.unsqueeze(-1)
    return torch.where(hit.any(dim=-1), head, tail)


def full_log_normaliser(full_logprobs: torch.Tensor, value: float) -> torch.Tensor:
    """log Z_T = log sum_v p(v)^(1/T) of full-vocabulary temperature scaling ("logit" form over V).

    Args:
        full_logprobs: [..., V] the teacher's log-softmax at temperature 1 over the whole vocabulary
            (where it exists: when the cache is written); value: T > 0.
    Returns:
        [...] (fp32, or float64); 0 at T = 1.
    """
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"temperature must be a finite number > 0, got {value}")
    lp = full_logprobs.to(torch.promote_types(full_logprobs.dtype, torch.float32))
    return torch.logsumexp(lp / value, dim=-1)


def full_tempered_logprobs(logprobs: torch.Tensor, value: float, log_normaliser: torch.Tensor) -> torch.Tensor:
    """log p_T(id) = log p(id) / T - log Z_T at any ids: [..., m] from [..., m] log-probs and [...] log Z_T
    (`full_log_normaliser`). Exact given the true log Z_T; with an estimate it is only as good as that."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"temperature must be a finite number > 0, got {value}")
    lp = logprobs.to(torch.promote_types(logprobs.dtype, torch.float32))
    return lp / value - log_normaliser.to(lp.dtype).unsqueeze(-1)
