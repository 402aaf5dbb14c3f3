"""Turning token sequences into padded batches: the one place that pads.

Right padding (`pad_right`) is what every forward pass over whole sequences uses (cache, evaluate,
distill, answer-span scoring): positions keep their index, and the padding is masked out. Left padding
(`pad_left`) is for generation, where every row's next token must sit in the same last column.
`collate` turns training examples (first_kd.training) into one right-padded batch with the rows of
their target positions, so the loss never needs [B, S, V] logits.
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


def collate(examples: list[dict], pad_id: int, use_teacher: bool, teacher=None) -> dict:
    """Right-pad a list of training examples (first_kd.training) into one batch.

    `teacher`, when given, turns the examples' cached top-k log-probs, all rows of the batch at once
    ([N, k] float32), into the teacher distribution (first_kd.training.TeacherTargets); without it the
    examples carry their own teacher_probs.

    Returns tensors:
        input_ids [B, S] long, attention_mask [B, S] long,
        rows [N] long: index into the flattened [B * S] hidden states of each target position,
        targets [N] long: the token each target position must predict,
        first_row [B] long: the row of each sequence's first target (the answer of a multiple-choice item),
        teacher_ids [N, k] long and teacher_probs [N, k'] float32 when use_teacher, else None; for the
            examples of a sampled store (which carry sample_counts) instead teacher_counts [N, k] long and
            teacher_logprobs [N, k] float32 (the draws' counts and log-probs; teacher_probs None),
        answer_index [B], n_choices [B] long, n_tokens: int (non-pad tokens).
    """
    input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], pad_id)
    width = input_ids.shape[1]
    rows, targets, first_row = [], [], []
    n_rows = 0
    for b, e in enumerate(examples):
        pos = torch.as_tensor(e["target_positions"], dtype=torch.long)
        rows.append(b * width + pos)
        targets.append(input_ids[b, pos + 1])
        first_row.append(n_rows)
        n_rows += len(pos)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "rows": torch.cat(rows),
        "targets": torch.cat(targets),
        "first_row": torch.tensor(first_row, dtype=torch.long),
        "answer_index": torch.tensor([e["answer_index"] for e in examples], dtype=torch.long),
        "n_choices": torch.tensor([e["n_choices"] for e in examples], dtype=torch.long),
        "n_tokens": int(attention_mask.sum()),
        "teacher_ids": None,
        "teacher_probs": None,
    }
    if use_teacher:
        batch["teacher_ids"] = torch.cat([torch.as_tensor(e["topk_ids"], dtype=torch.long) for e in examples])
        if "sample_counts" in examples[0]:
            batch["teacher_counts"] = torch.cat([torch.as_tensor(e["sample_counts"], dtype=torch.long) for e in examples])
            batch["teacher_logprobs"] = torch.cat([torch.as_tensor(e["topk_logprobs"], dtype=torch.float32)
                                                   for e in examples])
        elif teacher is not None:
            batch["teacher_probs"] = teacher(torch.cat([torch.as_tensor(e["topk_logprobs"], dtype=torch.float32)
                                                        for e in examples]))
        else:
            batch["teacher_probs"] = torch.cat([torch.as_tensor(e["teacher_probs"], dtype=torch.float32)
                                                for e in examples])
    return batch
