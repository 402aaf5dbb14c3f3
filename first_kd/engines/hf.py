"""The transformers engine: a causal LM from transformers run on one device, its output head applied only
at the target positions (see first_kd.engines for what an engine provides)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from first_kd.batching import length_batches, pad_right
from first_kd.engines.sampling import sample_rows
from first_kd.models import head_logits, last_hidden_states


def by_probability(sampled) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sampled row (first_kd.engines.sampling.SampledRows) in a store's order: distinct ids by decreasing
    teacher probability, padding last with log-prob -inf: (ids, logprobs, counts), each [N, n]."""
    key = sampled.logprobs.masked_fill(sampled.counts == 0, float("-inf"))
    order = key.argsort(dim=1, descending=True, stable=True)
    return sampled.ids.gather(1, order), key.gather(1, order), sampled.counts.gather(1, order)


def topk_at_positions(model, input_ids, attention_mask, rows, cols, k: int, head_chunk: int = 1024,
                      draws: Optional[int] = None, generator: Optional[torch.Generator] = None):
    """Top-k of the full-vocabulary log-softmax at selected positions only (or, with `draws`, a sample).

    Args:
        input_ids, attention_mask: [B, S] (right-padded).
        rows, cols: [N] batch row and sequence position of each wanted position.
        draws: instead of the top-k, draw this many ids per position from the teacher's softmax at temperature
            1 with `generator` (first_kd.engines.sampling.sample_rows), kept as `by_probability` orders them.
    Returns:
        (ids [N, k] int64, logprobs [N, k] float32), ids by decreasing probability; with `draws`,
        (ids, logprobs, counts) [N, draws] each, padding last (log-prob -inf, count 0).

    Runs the transformer body once, then the output head on the N wanted hidden states only, in chunks
    of `head_chunk` rows: a [B, S, V] logits tensor is never built. Log-softmax keeps the order, so the
    top-k is taken on the raw logits and shifted by each row's logsumexp, computed in place in the
    chunk's logits (whose max is the top-1 just found): no [N, V] log-softmax is ever written.
    """
    hidden = last_hidden_states(model, input_ids, attention_mask)
    picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]  # device_map=auto: the last layer's device
    out_ids, out_lp, out_counts = [], [], []
    for lo in range(0, picked.shape[0], head_chunk):
        logits = head_logits(model, picked[lo: lo + head_chunk])  # [n, V] fp32, a fresh tensor we may overwrite
        if draws is not None:
            ids, lp, counts = by_probability(sample_rows(logits, draws, generator))
            out_ids.append(ids)
            out_lp.append(lp)
            out_counts.append(counts)
            continue
        values, ids = torch.topk(logits, k, dim=-1)
        top = values[:, :1]
        lse = top + logits.sub_(top).exp_().sum(dim=-1, keepdim=True).log()
        out_ids.append(ids)
        out_lp.append(values - lse)
    if draws is not None:
        return torch.cat(out_ids), torch.cat(out_lp), torch.cat(out_counts)
    return torch.cat(out_ids), torch.cat(out_lp)


def unit_topk(model, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray], k: int, batch_size: int,
              pad_id: int, device=None, on_batch: Optional[Callable[[int, int], None]] = None,
              draw_seed: Optional[int] = None) -> tuple[np.ndarray, ...]:
    """The teacher's top-k rows of one unit.

    Args:
        sequences: the unit's token sequences (1-D int arrays), in store order.
        positions: for each sequence, its target positions whose rows are in the unit (1-D int arrays).
        batch_size: sequences per forward; batches group sequences of similar length, longest first,
            and depend on the unit only, so a unit's rows are the same whoever computes them.
        pad_id: id written into the (masked) right padding.
        device: where the inputs go (default: the model's device).
        on_batch: called after each forward with (rows computed, tokens run), for progress.
        draw_seed: sample k draws per position instead of the top-k (a sampled store), from one generator
            seeded with draw_seed and used in the unit's fixed batch order: the rows are a function of the
            unit and the seed (on one kind of device).
    Returns:
        (ids [n, k] int64, logprobs [n, k] float32) numpy, n = the total number of positions, rows in the
        order of `sequences` then `positions`; with draw_seed also counts [n, k] int64 (see topk_at_positions).
    """
    device = model.device if device is None else device
    counts = np.array([len(p) for p in positions], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    unit_ids = np.zeros((int(starts[-1]), k), dtype=np.int64)
    unit_lp = np.zeros((int(starts[-1]), k), dtype=np.float32)
    unit_counts = np.zeros((int(starts[-1]), k), dtype=np.int64)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    generator = None
    if draw_seed is not None:
        # on the head's device, where the logits are drawn from (device_map="auto": the last layer's)
        head_device = model.get_output_embeddings().weight.device
        generator = torch.Generator(device=head_device).manual_seed(int(draw_seed))
    with torch.inference_mode():
        for batch in length_batches(lengths, batch_size):
            ids, mask = pad_right([sequences[j] for j in batch], pad_id)
            rows = torch.from_numpy(np.repeat(np.arange(len(batch), dtype=np.int64), counts[batch])).to(device)
            cols = torch.from_numpy(np.concatenate([np.asarray(positions[j], dtype=np.int64) for j in batch]))
            out = topk_at_positions(model, ids.to(device), mask.to(device), rows, cols.to(device), k,
                                    draws=k if generator is not None else None, generator=generator)
            where = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in batch])
            unit_ids[where] = out[0].cpu().numpy()
            unit_lp[where] = out[1].cpu().numpy()
            if generator is not None:
                unit_counts[where] = out[2].cpu().numpy()
            if on_batch is not None:
                on_batch(len(where), int(mask.sum()))
    return (unit_ids, unit_lp, unit_counts) if generator is not None else (unit_ids, unit_lp)
