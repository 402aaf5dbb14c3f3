"""Turning token sequences into padded batches: the one place that pads.

Right padding (`pad_right`) is what every forward pass over whole sequences uses (cache, evaluate,
distill, answer-span scoring): positions keep their index, and the padding is masked out. Left padding
(`pad_left`) is for generation, where every row's next token must sit in the same last column.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def pad_right(seqs: Sequence, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences.

    Args:
        seqs: B sequences of token ids (lists, numpy arrays or 1-D tensors), each non-empty.
        pad_id: id written into the padding (masked out, so any valid id works).
    Returns:
        input_ids [B, S] long and attention_mask [B, S] long (1 on tokens, 0 on padding), S = longest.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def pad_left(seqs: Sequence, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences (for generation): same shapes as `pad_right`, padding first."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def length_batches(lengths: np.ndarray, batch_size: int):
    """Indices of sequences in batches of similar length, longest first (stable, so deterministic)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    for lo in range(0, len(order), batch_size):
        yield order[lo: lo + batch_size]
