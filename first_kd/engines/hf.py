"""The transformers engine: a causal LM from transformers run on one device, its output head applied only
at the target positions (see first_kd.engines for what an engine provides)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from first_kd.batching import length_batches, pad_right
from first_kd.models import head_logits, last_hidden_states


def topk_at_positions(model, input_ids, attention_mask, rows, cols, k: int, head_chunk: int = 1024):
    """Top-k of the full-vocabulary log-softmax at selected positions only.

    Args:
        input_ids, attention_mask: [B, S] (right-padded).
        rows, cols: [N] batch row and sequence position of each wanted position.
    Returns:
        (ids [N, k] int64, logprobs [N, k] float32), ids by decreasing probability.

    Runs the transformer body once, then the output head on the N wanted hidden states only, in chunks
    of `head_chunk` rows: a [B, S, V] logits tensor is never built. Log-softmax keeps the order, so the
    top-k is taken on the raw logits and shifted by each row's logsumexp, computed in place in the
    chunk's logits (whose max is the top-1 just found): no [N, V] log-softmax is ever written.
    """
    hidden = last_hidden_states(model, input_ids, attention_mask)
    picked = hidden[rows.to(hidden.device), cols.to(hidden.device)]  # device_map=auto: the last layer's device
    out_ids, out_lp = [], []
    for lo in range(0, picked.shape[0], head_chunk):
        logits = head_logits(model, picked[lo: lo + head_chunk])  # [n, V] fp32, a fresh tensor we may overwrite
        values, ids = torch.topk(logits, k, dim=-1)
        top = values[:, :1]
        lse = top + logits.sub_(top).exp_().sum(dim=-1, keepdim=True).log()
        out_ids.append(ids)
        out_lp.append(values - lse)
    return torch.cat(out_ids), torch.cat(out_lp)


def unit_topk(model, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray], k: int, batch_size: int,
              pad_id: int, device=None, on_batch: Optional[Callable[[int, int], None]] = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k rows of one unit.

    Args:
        sequences: the unit's token sequences (1-D int arrays), in store order.
        positions: for each sequence, its target positions whose rows are in the unit (1-D int arrays).
        batch_size: sequences per forward; batches group sequences of similar length, longest first,
            and depend on the unit only, so a unit's rows are the same whoever computes them.
        pad_id: id written into the (masked) right padding.
        device: where the inputs go (default: the model's device).
        on_batch: called after each forward with (rows computed, tokens run), for progress.
    Returns:
        (ids [n, k] int64, logprobs [n, k] float32) numpy, n = the total number of positions, rows in the
        order of `sequences` then `positions`.
    """
    device = model.device if device is None else device
    counts = np.array([len(p) for p in positions], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    unit_ids = np.zeros((int(starts[-1]), k), dtype=np.int64)
    unit_lp = np.zeros((int(starts[-1]), k), dtype=np.float32)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    with torch.inference_mode():
        for batch in length_batches(lengths, batch_size):
            ids, mask = pad_right([sequences[j] for j in batch], pad_id)
            rows = torch.from_numpy(np.repeat(np.arange(len(batch), dtype=np.int64), counts[batch])).to(device)
            cols = torch.from_numpy(np.concatenate([np.asarray(positions[j], dtype=np.int64) for j in batch]))
            top_ids, top_lp = topk_at_positions(model, ids.to(device), mask.to(device), rows, cols.to(device), k)
            where = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in batch])
            unit_ids[where] = top_ids.cpu().numpy()
            unit_lp[where] = top_lp.cpu().numpy()
            if on_batch is not None:
                on_batch(len(where), int(mask.sum()))
    return unit_ids, unit_lp
