"""The teacher's top-k distribution after temperature: the one place this math lives.

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
"""

from __future__ import annotations

import math
from typing import Optional

import torch

FORMS = ("logit", "prob")


def other_mass_logprob(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_k p_k) for [..., k] log-probs -> [...]; -inf when the top-k holds all the mass."""
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
    tempered = torch.softmax(logp / value if form == "logit" else torch.exp(logp) / value, dim=-1)
    return _with_rest(tempered, logp) if other_bucket else tempered


def _with_rest(topk_probs: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[..., k] probabilities summing to 1 -> [..., k+1]: scaled to the top-k's own mass, the rest last."""
    rest = torch.exp(other_mass_logprob(topk_logprobs))
    return torch.cat([topk_probs * (1.0 - rest).unsqueeze(-1), rest.unsqueeze(-1)], dim=-1)


TEACHER_NORMS = ("auto", "logit", "prob-softmax", "linear")
_FORM_OF_NORM = {"logit": "logit", "prob-softmax": "prob"}


def smooth_top1(probs: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing of a top-k distribution [..., k] (FIRST's "Distill w/ LS" baseline): a fraction
    `smoothing` of the largest probability is taken off it and spread evenly over the other k - 1."""
    k = probs.shape[-1]
    if smoothing == 0.0 or k < 2:
        return probs
    top = probs.argmax(dim=-1, keepdim=True)
    moved = probs.gather(-1, top) * smoothing
    out = probs + moved / (k - 1)
    return out.scatter(-1, top, probs.gather(-1, top) - moved)


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
    if norm == "linear":
        shifted = torch.exp(logp) + eps
        probs = shifted / shifted.sum(dim=-1, keepdim=True)
    else:
        if norm != "auto":
            if form is not None and form != _FORM_OF_NORM[norm]:
                raise ValueError(f"the store's temperature is of the {form} form, which --teacher-norm {norm} "
                                 "cannot apply: use --teacher-norm auto, or calibrate with the matching --form")
            form = _FORM_OF_NORM[norm]
        probs = teacher_distribution(logp, form, value)
    probs = smooth_top1(probs, smoothing)
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
