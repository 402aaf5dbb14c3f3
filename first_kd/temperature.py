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

With ``other_bucket=True`` a (k+1)-th category holds the mass outside the top-k, 1 - sum(p). Under a
temperature it is treated as one more category whose log-probability is log(1 - sum p) (logit form)
or whose probability is 1 - sum p (prob form). That is exact when the rest is a single token and an
approximation otherwise: the tail's own shape is not cached, so it cannot be rescaled token by token.
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
    if other_bucket:
        logp = torch.cat([logp, other_mass_logprob(logp).unsqueeze(-1)], dim=-1)
    if form == "logit":
        return torch.softmax(logp / value, dim=-1)
    return torch.softmax(torch.exp(logp) / value, dim=-1)


def distribution_from_record(
    topk_logprobs: torch.Tensor, record: Optional[dict], other_bucket: bool = False
) -> torch.Tensor:
    """`teacher_distribution` with the temperature taken from a store's `temperature` record
    ({} or None means no temperature)."""
    if not record:
        return teacher_distribution(topk_logprobs, None, 1.0, other_bucket)
    return teacher_distribution(topk_logprobs, record["form"], float(record["value"]), other_bucket)


def describe(record: Optional[dict]) -> str:
    """The one way a temperature record is named to people: "raw" (none), "prob c=0.4", "logit T=1.37"."""
    if not record:
        return "raw"
    symbol = "c" if record.get("form") == "prob" else "T"
    return f"{record.get('form')} {symbol}={float(record.get('value')):.4g}"
