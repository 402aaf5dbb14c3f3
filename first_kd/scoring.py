"""Scoring a model's or a teacher's answers: option probabilities of multiple-choice items.

Pure functions of tensors (shapes documented), shared by `evaluate` and the trainer's validation.
"""

from __future__ import annotations

import torch


def option_mask(n_choices: torch.Tensor, n_options: int) -> torch.Tensor:
    """[B, C] bool, True for the options an item has (the first n_choices[b] letters)."""
    return torch.arange(n_options, device=n_choices.device)[None, :] < n_choices[:, None]


def options_from_logits(option_logits: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
    """Renormalise letter logits over each item's options.

    Args:
        option_logits: [B, C] logits of the option letters A.. (C = most options of any item).
        n_choices: [B] number of options of each item (1..C).
    Returns:
        [B, C] fp32 probabilities, 0 for letters beyond an item's options.
    """
    mask = option_mask(n_choices, option_logits.shape[1])
    return torch.softmax(option_logits.float().masked_fill(~mask, float("-inf")), dim=-1)


def options_from_topk(topk_ids: torch.Tensor, topk_probs: torch.Tensor, choice_ids: torch.Tensor,
                      n_choices: torch.Tensor) -> torch.Tensor:
    """Option probabilities from a top-k distribution: absent options get 0, then renormalise.

    Args:
        topk_ids: [B, k] token ids; topk_probs: [B, k] their probabilities (after temperature).
        choice_ids: [C] token id of each option letter; n_choices: [B] options per item.
    Returns:
        [B, C] fp32, rows summing to 1 over the item's options; uniform over them when none is in the top-k.
    """
    match = topk_ids[:, :, None] == choice_ids[None, None, :]  # [B, k, C]
    mass = (topk_probs.float()[:, :, None] * match).sum(dim=1)  # [B, C]
    mask = option_mask(n_choices, choice_ids.shape[0])
    mass = mass * mask
    total = mass.sum(dim=1, keepdim=True)
    uniform = mask.float() / n_choices[:, None].float()
    return torch.where(total > 0, mass / total.clamp(min=torch.finfo(torch.float32).tiny), uniform)
