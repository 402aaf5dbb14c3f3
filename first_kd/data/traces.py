"""Dualformer-style trace variants: one response written as several training targets that show all,
part or none of its reasoning steps, each opened by a control marker.

A response is a sequence of steps separated by `sep` (default a newline); empty and whitespace-only
pieces are dropped and the LAST piece is the answer line, which every variant keeps. For each drop
level in [0, 1] a variant keeps the steps that are not dropped, in their order:

    variant = marker + sep + sep.join(kept steps + [answer line])
    marker  = fast_marker ("[fast]") at level 1 (no steps left), slow_marker ("[slow]") below 1
    id      = f"{id}#full" (level 0), f"{id}#fast" (level 1), f"{id}#drop{round(100 * level)}" otherwise

Level `l` drops round(l * n_steps) of the n steps (Python's round: halves go to the even number), chosen
by `random.Random(f"{seed}:{id}:{level}")`, so a variant depends only on its record and level, never on
the order records arrive in or on which other levels are asked for. A response that is only an answer
line still gives one variant per level; they differ only in the marker (and id). The markers let one
model answer slow (with a trace) or fast (answer only) on request, or pick for itself when the prompt
ends before the marker (`first-kd evaluate --modes slow,fast,auto`).

Distilling dropped variants: train them with `--loss ce` (or a CE mix, `--alpha`), not a pure top-k KL.
The teacher never saw a trace with a step skipped: at the position after a skip its top-k still
predicts the skipped step (what it would have written next), not the step the variant continues with,
so KL to the teacher there teaches the student to expect text the target then leaves out. The full
(level 0) variant is the teacher's own text and its top-k fits it.
"""

from __future__ import annotations

import math
import random

# Variant ids name a level by its whole percentage, so two levels closer than this would share an id.
_ID_RESOLUTION = 100


def parse_levels(text: str) -> list[float]:
    """Drop levels from a comma-separated list ("0,0.5,1" -> [0.0, 0.5, 1.0]), in ascending order.

    Raises ValueError (naming the problem) for an empty list, a value that is not a number, a level
    outside [0, 1], a repeated level, or two levels that would give the same variant id (closer than 0.01).
    """
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError("no levels given; write them comma-separated, e.g. 0,0.5,1")
    levels = []
    for part in parts:
        try:
            level = float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a number; write levels in [0, 1] comma-separated, "
                             f"e.g. 0,0.5,1") from None
        if not math.isfinite(level) or not 0.0 <= level <= 1.0:
            raise ValueError(f"level {part} is outside [0, 1] (0 = full trace, 1 = answer only)")
        levels.append(level)
    levels.sort()
    ids: dict[str, float] = {}
    for level in levels:
        suffix = variant_suffix(level)
        if suffix in ids:
            same = "is repeated" if ids[suffix] == level else f"and {ids[suffix]:g} give the same variant id #{suffix}"
            raise ValueError(f"level {level:g} {same}; give each level once, at least 0.01 apart")
        ids[suffix] = level
    return levels


def variant_suffix(level: float) -> str:
    """"full" (level 0), "fast" (level 1) or f"drop{round(100 * level)}": what follows '#' in a variant id."""
    if level == 0:
        return "full"
    if level == 1:
        return "fast"
    return f"drop{round(_ID_RESOLUTION * level)}"


def marker_for(level: float, slow_marker: str = "[slow]", fast_marker: str = "[fast]") -> str:
    """The control marker opening the variant at drop `level`: fast only when no step is left (level 1)."""
    return fast_marker if level == 1 else slow_marker


def split_trace(response: str, sep: str) -> tuple[list[str], str]:
    """(steps, answer line) of a response: pieces between `sep`, empty or whitespace-only ones dropped,
    the last piece being the answer line. Pieces are kept as written (not stripped).

    Raises ValueError when `sep` is empty or the response has no non-empty piece.
    """
    if not sep:
        raise ValueError("the step separator is empty; give a separator such as a newline")
    pieces = [p for p in response.split(sep) if p.strip()]
    if not pieces:
        raise ValueError("the response is empty: it has no answer line")
    return pieces[:-1], pieces[-1]


def drop_steps(steps: list[str], level: float, rng: random.Random) -> list[str]:
    """The steps kept at drop `level`: round(level * len(steps)) of them, drawn with `rng`, are dropped;
    the rest stay in their order."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"drop level must be in [0, 1], got {level}")
    n_drop = round(level * len(steps))
    dropped = set(rng.sample(range(len(steps)), n_drop))
    return [step for i, step in enumerate(steps) if i not in dropped]


def trace_variants(rid: str, response: str, levels: list[float], seed: int, sep: str,
                   slow_marker: str = "[slow]", fast_marker: str = "[fast]") -> list[tuple[str, str]]:
    """[(variant id, variant response)] of one response, one per level in the order given (see the
    module docstring for the exact text, ids and which steps are dropped)."""
    steps, answer = split_trace(response, sep)
    out = []
    for level in levels:
        kept = drop_steps(steps, level, random.Random(f"{seed}:{rid}:{float(level)}"))
        marker = marker_for(level, slow_marker, fast_marker)
        out.append((f"{rid}#{variant_suffix(level)}", marker + sep + sep.join(kept + [answer])))
    return out


def marker_prefix_ids(tokenizer, marker: str, sep: str) -> list[int]:
    """Token ids of `marker + sep`, tokenized on their own without special tokens: a variant's target starts
    with exactly these ids in training (first_kd.data.tokenize), and `first-kd evaluate --modes slow,fast` forces them
    after the prompt, so the forced start is token for token what the model learnt to continue."""
    return list(tokenizer(marker + sep, add_special_tokens=False)["input_ids"])
