"""Sampled teacher rows: n tokens drawn per target position from the teacher's logits, kept in a compact
fixed-width form (the cache side of RS-KD, Anshumann et al. 2025, "Sparse Logit Sampling").

Where top-k keeps the k most probable ids (a biased summary: the tail is structurally zero), a sampled
row keeps n draws *with replacement* from a proposal q over the full vocabulary, with their counts.
Any target p then has the unbiased estimate E_q[(1/n) sum_i c_i p(x_i)/q(x_i) f(x_i)] = sum_v p(v) f(v)
for every f, so the student's cross-entropy and its gradient are unbiased (first_kd.losses.sampled_kd_loss).

The proposal is the teacher at a temperature: q = softmax(logits / proposal_temperature). The paper
ships proposal_temperature = 1 (q = the teacher, every importance weight 1; about 50 draws give about a
dozen distinct ids on an LLM). Sampling at the calibrated temperature instead makes the counts an
unbiased sample of the tempered teacher (see first_kd.temperature for which targets are exact).

A row is returned as unique ids with counts, not as n raw draws: the head repeats, so the distinct ids
are far fewer than n, and (id, count) is what a store keeps. Each row also carries the teacher's
log-prob at temperature 1 and the proposal's log-prob at each id, which is all the loss needs to
weight a draw for any target that is known per id.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class SampledRows(NamedTuple):
    """n draws per row in compact form; m = the width (n), slots past a row's distinct ids are padding.

    ids: [N, m] int64, a row's distinct sampled ids in increasing order, then padding (id 0).
    counts: [N, m] int32, how often each id was drawn; 0 marks padding; every row sums to n.
    logprobs: [N, m] the teacher's full-vocabulary log-softmax at temperature 1 at each id (0 at padding).
    proposal_logprobs: [N, m] log q at each id, q = softmax(logits / proposal_temperature) (0 at padding);
        at proposal_temperature 1 the same numbers as logprobs.
    """

    ids: torch.Tensor
    counts: torch.Tensor
    logprobs: torch.Tensor
    proposal_logprobs: torch.Tensor


def compact_draws(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw draws -> (distinct ids, counts), both [N, n], one row at a time, without a Python loop.

    Args:
        draws: [N, n] int64 sampled ids (repeats allowed).
    Returns:
        ids [N, n] int64 (a row's distinct ids increasing, then 0), counts [N, n] int32 (0 = padding,
        each row sums to n).
    """
    if draws.dim() != 2:
        raise ValueError(f"draws must be [N, n], got {tuple(draws.shape)}")
    s = draws.long().sort(dim=1).values
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = starts.long().cumsum(dim=1) - 1  # the slot of each draw's id: 0, 0, 1, 2, 2, ...
    counts = torch.zeros(s.shape, dtype=torch.int32, device=s.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.int32))
    ids = torch.zeros_like(s)
    # Only each run's first draw writes its slot, so no slot is written twice.
    ids[torch.arange(s.shape[0], device=s.device).unsqueeze(1).expand_as(s)[starts], slot[starts]] = s[starts]
    return ids, counts


def sample_rows(logits: torch.Tensor, n: int, generator: Optional[torch.Generator] = None,
                proposal_temperature: float = 1.0) -> SampledRows:
    """Draw n tokens per row with replacement from q = softmax(logits / proposal_temperature).

    Args:
        logits: [N, V] teacher logits at the wanted positions (fp32; bf16 / fp16 are upcast, float64 stays).
        n: draws per row (>= 1); the width of every returned tensor.
        generator: a torch.Generator on the logits' device; the rows are a pure function of (logits, n,
            proposal_temperature, the generator's state), so a seeded generator per unit makes a unit's
            rows reproducible. The same seed on another device type gives other draws.
        proposal_temperature: > 0; 1 samples the teacher itself (every importance weight is then 1 for
            the teacher as target).
    Returns:
        SampledRows (see its docstring); logprobs and proposal_logprobs in the math dtype (fp32, or
        float64 for float64 logits).

    Tokens whose proposal weight exp((z - max) / proposal_temperature) underflows the math dtype (about
    e^-87 of the top token's in fp32) cannot be drawn: a bias of at most V * 1e-38 in any expectation.
    Memory: two [N, V] buffers besides the input; callers chunk the rows as the top-k head does.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1 draws per row, got {n}")
    if not (proposal_temperature > 0 and proposal_temperature < float("inf")):
        raise ValueError(f"proposal_temperature must be a finite number > 0, got {proposal_temperature}")
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    top = z.amax(dim=1, keepdim=True)
    weights = ((z - top) / proposal_temperature).exp_()  # unnormalised q, max 1 per row
    draws = torch.multinomial(weights, n, replacement=True, generator=generator)
    ids, counts = compact_draws(draws)
    pad = counts == 0
    g = z.gather(1, ids)
    logp = g - torch.logsumexp(z, dim=1, keepdim=True)
    if proposal_temperature == 1.0:
        logq = logp  # the same numbers, so a teacher target's weights are exactly 1
    else:
        logq = (g - top) / proposal_temperature - weights.sum(dim=1, keepdim=True).log()
    return SampledRows(ids, counts, logp.masked_fill(pad, 0.0), logq.masked_fill(pad, 0.0))
