"""Dualformer trace dropping (Su et al. 2024, arXiv 2410.09918): one response, a trace of reasoning steps and
its answer, shown to the model with all, part or none of its trace, each target opened by a control marker.

A response is pieces separated by `sep` (default a newline); empty and whitespace-only pieces are dropped. Each
piece is a *step* with a *type*. What is dropped is decided by structure, with these operations (pure functions
below; `rng` is a seeded random.Random):

    drop_types(steps, types)                 every step of those types           (Dualformer level 1: close clauses)
    strip_tokens(steps, patterns)            the tokens a regex matches, per type (level 2: cost tokens ' c\\d+')
    drop_fraction(steps, type, f, rng)       round(f * n) of the n steps of a type, chosen with rng
                                                                                  (level 3: 30% of create clauses)
    drop_types(steps, trace types)           the whole trace                      (level 4: solution only)

Every variant, whichever way it is made, is the text

    marker + sep + sep.join(kept steps [+ answer line])

with marker = fast_marker ("[fast]") when the level leaves no trace step, slow_marker ("[slow]") otherwise. The
markers let one model answer slow (with a trace) or fast (answer only) on request, or pick for itself when the
prompt ends before the marker (`first-kd evaluate --modes slow,fast,auto`); first_kd.data.tokenize tokenizes the
marker + sep on its own (`marker_prefix_ids`), exactly the ids evaluate forces.

Two ways to use them:

  * Fixed levels (--trace-levels 0,0.5,1): the response's last piece is the answer line, the other pieces are
    steps of one type; each drop level in [0, 1] is one *materialised* variant (`trace_variants`), made once
    when the data is read, the same every epoch:
        id     = f"{id}#full" (level 0), f"{id}#fast" (level 1), f"{id}#drop{round(100 * level)}" otherwise
        level l drops round(l * n) of the n steps, chosen by random.Random(f"{seed}:{id}:{level}"), so a variant
        depends only on its record and level, never on record order or on which other levels are asked for.
  * A trace spec (--trace-spec astar | steps | FILE, first_kd.data.trace_spec): typed steps, levels made of
    operations, each with a probability. Every time an example is drawn for training its level is drawn again,
    from Cat(p_0, ..., p_L), and so are the random parts of the operations: `spec_variant(spec, probs, rid,
    response, seed, epoch, sep)` is a pure function of (trace seed, epoch, example id) through
    `example_rng`, so one example is seen with many traces, and a resumed run or another process count
    draws exactly the same ones (first_kd.loader knows each step's epoch; first_kd.training.DataExamples
    is asked for (index, epoch)). Validation uses the epoch-0 draw, so its losses compare across epochs.

Why `first-kd cache` (and `distill --store`) refuse --trace-spec: a store holds the teacher's top-k at the
target positions of fixed token sequences, computed once. A trace re-drawn every epoch is a new token sequence
every epoch, which no store holds. Cache fixed variants with --trace-levels instead (materialised once).

Distilling dropped variants: train them with `--loss ce` (or a CE mix, `--alpha`), not a pure top-k KL. The
teacher never saw a trace with a step skipped: at the position after a skip its top-k still predicts the
skipped step, not the step the variant continues with. The full (level 0) variant is the teacher's own text.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

# Variant ids name a level by its whole percentage, so two levels closer than this would share an id.
_ID_RESOLUTION = 100
STEP = "step"  # the one step type of --trace-levels responses
PROBS_TOLERANCE = 1e-6  # how far level probabilities may sum from 1

Step = tuple[str, str]  # (step type, text as written)


# ----------------------------------------------------------------------------------------------
# The operations (pure)


def drop_types(steps: Sequence[Step], types: Sequence[str]) -> list[Step]:
    """`steps` without every step whose type is in `types`, the rest in order."""
    drop = set(types)
    return [step for step in steps if step[0] not in drop]


def strip_tokens(steps: Sequence[Step], patterns: Mapping[str, str]) -> list[Step]:
    """`steps` with, in each step whose type has a pattern, every match of that regex removed
    (`re.sub(pattern, "", text)`): {"create": r" c\\d+"} makes "create 3 4 c2 c5" "create 3 4"."""
    return [(kind, re.sub(patterns[kind], "", text)) if kind in patterns else (kind, text) for kind, text in steps]


def drop_fraction(steps: Sequence[Step], kind: str, fraction: float, rng: random.Random) -> list[Step]:
    """`steps` without round(fraction * n) of its n steps of type `kind` (Python's round: halves go to the even
    number): the j-th steps of that type for j in rng.sample(range(n), round(fraction * n)). Other steps and
    the order are kept. Raises ValueError for a fraction outside [0, 1]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"drop fraction must be in [0, 1], got {fraction}")
    positions = [i for i, (step_kind, _) in enumerate(steps) if step_kind == kind]
    dropped = {positions[j] for j in rng.sample(range(len(positions)), round(fraction * len(positions)))}
    return [step for i, step in enumerate(steps) if i not in dropped]


def classify_steps(pieces: Sequence[str], types: Sequence[tuple[str, str]]) -> list[Step]:
    """Each piece with its type: the first (name, regex) of `types` whose regex matches it (re.search).
    Raises ValueError naming a piece no type matches."""
    compiled = [(name, re.compile(pattern)) for name, pattern in types]
    out = []
    for piece in pieces:
        kind = next((name for name, pattern in compiled if pattern.search(piece)), None)
        if kind is None:
            raise ValueError(f"step {piece[:60]!r} matches none of the step types ({', '.join(n for n, _ in types)})")
        out.append((kind, piece))
    return out


def split_pieces(response: str, sep: str) -> list[str]:
    """The pieces of a response between `sep`, empty or whitespace-only ones dropped, kept as written (not
    stripped). Raises ValueError when `sep` is empty or no piece is left."""
    if not sep:
        raise ValueError("the step separator is empty; give a separator such as a newline")
    pieces = [p for p in response.split(sep) if p.strip()]
    if not pieces:
        raise ValueError("the response is empty: it has no answer line")
    return pieces


def split_trace(response: str, sep: str) -> tuple[list[str], str]:
    """(steps, answer line) of a response: its pieces (`split_pieces`), the last being the answer line.
    Raises ValueError when `sep` is empty or the response has no non-empty piece."""
    pieces = split_pieces(response, sep)
    return pieces[:-1], pieces[-1]


def variant_text(marker: str, sep: str, kept: Sequence[str]) -> str:
    """The variant a target shows: `marker + sep + sep.join(kept)`."""
    return marker + sep + sep.join(kept)


# ----------------------------------------------------------------------------------------------
# Fixed levels (--trace-levels)


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


def drop_steps(steps: list[str], level: float, rng: random.Random) -> list[str]:
    """The steps kept at drop `level`: round(level * len(steps)) of them, drawn with `rng`, are dropped;
    the rest stay in their order (`drop_fraction` over steps of one type)."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"drop level must be in [0, 1], got {level}")
    return [text for _, text in drop_fraction([(STEP, s) for s in steps], STEP, level, rng)]


def trace_variants(rid: str, response: str, levels: list[float], seed: int, sep: str,
                   slow_marker: str = "[slow]", fast_marker: str = "[fast]") -> list[tuple[str, str]]:
    """[(variant id, variant response)] of one response, one per level in the order given (see the
    module docstring for the exact text, ids and which steps are dropped)."""
    steps, answer = split_trace(response, sep)
    out = []
    for level in levels:
        kept = drop_steps(steps, level, random.Random(f"{seed}:{rid}:{float(level)}"))
        marker = marker_for(level, slow_marker, fast_marker)
        out.append((f"{rid}#{variant_suffix(level)}", variant_text(marker, sep, kept + [answer])))
    return out


def marker_prefix_ids(tokenizer, marker: str, sep: str) -> list[int]:
    """Token ids of `marker + sep`, tokenized on their own without special tokens: a variant's target starts
    with exactly these ids in training (first_kd.data.tokenize), and `first-kd evaluate --modes slow,fast` forces them
    after the prompt, so the forced start is token for token what the model learnt to continue."""
    return list(tokenizer(marker + sep, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------
# Trace specs (--trace-spec): the structure of a response and its levels, read by first_kd.data.trace_spec


@dataclass(frozen=True)
class Op:
    """One operation of a level: kind "drop" (every step of `types`), "strip" (the `strip` tokens of `types`),
    "drop_fraction" (round(fraction * n) of the steps of types[0], at random) or "drop_trace" (every trace step)."""

    kind: str
    types: tuple[str, ...] = ()
    fraction: float = 1.0


@dataclass(frozen=True)
class Level:
    """A drop level: its name, default probability and operations, applied in order."""

    name: str
    p: float
    ops: tuple[Op, ...] = ()


@dataclass(frozen=True)
class TraceSpec:
    """The structure of a response (see first_kd.data.trace_spec for the YAML keys).

    types: (name, regex) in match order; strip: {type: regex}; kept: types outside the trace (never dropped);
    answer_last: the last piece is an answer line, untyped and always kept; separator: None = --step-separator."""

    name: str
    types: tuple[tuple[str, str], ...]
    levels: tuple[Level, ...]
    strip: tuple[tuple[str, str], ...] = ()
    kept: tuple[str, ...] = ()
    answer_last: bool = False
    separator: Optional[str] = None
    path: str = ""
    sha256: str = ""

    @property
    def trace_types(self) -> tuple[str, ...]:
        """The step types that make the trace: every type not in `kept`."""
        return tuple(name for name, _ in self.types if name not in self.kept)

    @property
    def level_names(self) -> list[str]:
        return [level.name for level in self.levels]

    @property
    def default_probs(self) -> list[float]:
        return [level.p for level in self.levels]

    def is_fast(self, level: Level) -> bool:
        """Whether `level` leaves no trace step, whatever the response: each trace type is dropped whole by one
        of its operations (drop, drop_fraction with fraction 1, drop_trace). Its target opens with the fast
        marker; any other level's with the slow marker."""
        gone: set[str] = set()
        for op in level.ops:
            if op.kind == "drop_trace" or (op.kind == "drop_fraction" and op.fraction == 1.0) or op.kind == "drop":
                gone.update(self.trace_types if op.kind == "drop_trace" else op.types)
        return set(self.trace_types) <= gone


def apply_op(steps: Sequence[Step], op: Op, spec: TraceSpec, rng: random.Random) -> list[Step]:
    """One operation of a level on typed steps (the functions above)."""
    if op.kind == "drop":
        return drop_types(steps, op.types)
    if op.kind == "strip":
        patterns = dict(spec.strip)
        return strip_tokens(steps, {kind: patterns[kind] for kind in op.types})
    if op.kind == "drop_fraction":
        return drop_fraction(steps, op.types[0], op.fraction, rng)
    if op.kind == "drop_trace":
        return drop_types(steps, spec.trace_types)
    raise ValueError(f"unknown operation {op.kind!r}")


def apply_level(steps: Sequence[Step], level: Level, spec: TraceSpec, rng: random.Random) -> list[Step]:
    """`steps` after each operation of `level` in turn, the random ones drawn with `rng`."""
    out = list(steps)
    for op in level.ops:
        out = apply_op(out, op, spec, rng)
    return out


def parse_probs(text: str, names: Sequence[str]) -> list[float]:
    """Level probabilities from "p0,p1,...", one per level named in `names` (`check_probs`)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        probs = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"write one number per level ({', '.join(names)}), comma-separated") from None
    check_probs(probs, names)
    return probs


def check_probs(probs: Sequence[float], names: Sequence[str]) -> None:
    """ValueError unless `probs` has one finite, non-negative number per level and they sum to 1 within 1e-6."""
    if len(probs) != len(names):
        raise ValueError(f"{len(probs)} probabilities for {len(names)} levels ({', '.join(names)}): give one per level")
    bad = next((p for p in probs if not math.isfinite(p) or p < 0), None)
    if bad is not None:
        raise ValueError(f"probability {bad:g} is negative or not finite: give numbers >= 0")
    if abs(sum(probs) - 1.0) > PROBS_TOLERANCE:
        raise ValueError(f"the probabilities sum to {sum(probs):.6g}, not 1: scale them to sum to 1")


def example_rng(seed: int, epoch: int, rid: str) -> random.Random:
    """The generator of one example's draw in one epoch: random.Random(f"{seed}:{epoch}:{rid}") (a string seed is
    hashed with SHA-512, so it is the same in every process, whatever PYTHONHASHSEED)."""
    return random.Random(f"{seed}:{epoch}:{rid}")


def draw_level(probs: Sequence[float], rng: random.Random) -> int:
    """Index of the level drawn from Cat(probs): the first whose cumulative probability exceeds rng.random()
    (the last level with p > 0 when rounding leaves the sum just under the draw)."""
    u, total = rng.random(), 0.0
    for i, p in enumerate(probs):
        total += p
        if u < total:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)


def split_response(spec: TraceSpec, response: str, sep: str) -> tuple[list[Step], Optional[str]]:
    """(typed steps, answer line or None) of a response under `spec` (`split_pieces`, `classify_steps`).
    Raises ValueError for an empty response or a step no type matches."""
    pieces = split_pieces(response, sep)
    answer = pieces.pop() if spec.answer_last else None
    return classify_steps(pieces, spec.types), answer


def spec_variant(spec: TraceSpec, probs: Sequence[float], rid: str, response: str, seed: int, epoch: int,
                 sep: str) -> tuple[Level, list[str]]:
    """(the level drawn, the texts kept: steps [+ answer line]) of example `rid` in `epoch`: the level from
    Cat(probs) and then its operations, all drawn with `example_rng(seed, epoch, rid)`. A pure function of
    its arguments. Raises ValueError for a response `split_response` refuses."""
    steps, answer = split_response(spec, response, sep)
    rng = example_rng(seed, epoch, rid)
    level = spec.levels[draw_level(probs, rng)]
    kept = [text for _, text in apply_level(steps, level, spec, rng)]
    return level, kept + ([answer] if answer is not None else [])
