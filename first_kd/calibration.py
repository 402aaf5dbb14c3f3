"""Fitting the teacher temperature on a held-out store (the library of `first-kd calibrate`).

What is calibrated
------------------
At every target position of the held-out store, the teacher's top-k distribution after temperature,
``teacher_distribution(topk_logprobs, form, value)`` (renormalised over the k cached ids, no other
bucket: the distribution `distill --loss first` trains on), makes one top-label prediction:

  * confidence = its largest probability (the top-1 cached id: temperature never reorders ids),
  * correct    = that id is the target token ``input_ids[pos + 1]``.

On a multiple-choice store every sequence has exactly one target position, the answer position, so
this is the teacher's answer confidence over its top-k *tokens* (not renormalised over the option
letters: that is what `first-kd evaluate --store` reports, a different number). On a prompt-response
store it is the same statement per response token. ECE uses `n_bins` equal-width bins (10, as FIRST).

Forms and objectives
--------------------
  * "prob" (FIRST): softmax(p / c) over the top-k probabilities. c is searched on the grid
    0.1, 0.2, ..., 1.0, then in steps of 0.02 within +-0.1 of the best coarse value, kept in (0, 1];
    the objective (ECE by default, as FIRST) is minimised over those points. Ties go to the larger c.
  * "logit": standard temperature scaling, softmax(logprob / T) over the top-k.
      - objective "nll" (default): T in [0.05, 20] minimising the NLL of the target token, found with
        scipy's bounded scalar minimiser on log T.
      - objective "ece": a grid of 41 log-spaced T over [0.05, 20] (it contains 1), then 21 log-spaced
        points between the neighbours of the best one. Ties go to the larger T.
    Ties go to the flatter distribution in both forms: among equals, claim less.

NLL over the top-k: positions whose target is outside the top-k are left out of every NLL here. That is
not a convenience but the exact likelihood: if the full-vocabulary model is softmax(z / T), then given
that the target lands in the cached set S (which depends on z only, never on the target),
P(target = i | target in S) = softmax over S of z / T, which is precisely the renormalised top-k
distribution under the logit form. So the restricted NLL is a proper conditional likelihood whose
minimiser is a consistent estimate of the full-vocabulary temperature. It is also the NLL of the
distribution training uses, up to a constant: that distribution gives a target outside S probability 0
at every T. The other-bucket alternative is not: it rescales log(rest mass) as if the rest were one
token, a misspecified model whose fit is biased whenever the rest holds several tokens.

Nothing here loads a model: fitting reads the raw top-k arrays (temperature 1) of the held-out store,
and the record written by `set_temperature` replaces any earlier one, so re-fitting is cheap.

Here: the fitting (pure functions, arrays in and numbers out), reading a store's positions as fitting
input, fitting on a store (`fit_store`) and the checks that a pair of stores may be calibrated together
(`check_pair`). The command (settings, same-command no-op, locks, the summary) is first_kd.commands.calibrate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from first_kd import metrics
from first_kd.errors import FirstKDError
from first_kd.store import read_rows
from first_kd.temperature import teacher_distribution

PROB_COARSE_GRID = tuple(round(0.1 * i, 10) for i in range(1, 11))  # 0.1 .. 1.0
PROB_FINE_STEP = 0.02
PROB_FINE_RADIUS = 0.1
LOGIT_BOUNDS = (0.05, 20.0)
LOGIT_COARSE_POINTS = 41  # odd, so the log-spaced grid over [0.05, 20] holds T = 1 (the middle point)
LOGIT_FINE_POINTS = 21
OBJECTIVES = ("ece", "nll")
# ECE bins: a few tens are usual (FIRST uses 10); past this the count is a typo, and the fit would
# run for minutes over bins that each hold a handful of positions.
MAX_BINS = 1000
DEFAULT_OBJECTIVE = {"prob": "ece", "logit": "nll"}

# Positions read per block from a store: bounds memory, and the bar ticks at this grain.
_READ_BLOCK = 1 << 18


# ----------------------------------------------------------------------------------------------
# Pure functions: arrays in, numbers out
# ----------------------------------------------------------------------------------------------


def target_rank(topk_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Where each target sits in its row of top-k ids.

    Args:
        topk_ids: [N, k] integer ids (distinct within a row; negative at padding columns of variable-k rows,
            which never match); targets: [N] integer token ids.
    Returns:
        [N] int64: the column of the target in its row, or -1 when it is not among the k ids.
    """
    topk_ids = np.asarray(topk_ids)
    targets = np.asarray(targets)
    if topk_ids.ndim != 2 or targets.shape != (topk_ids.shape[0],):
        raise ValueError(f"expected topk_ids [N, k] and targets [N], got {topk_ids.shape} and {targets.shape}")
    hit = (topk_ids == targets[:, None]) & (topk_ids >= 0)
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int64)


def _check_inputs(topk_logprobs, ranks) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.as_tensor(topk_logprobs).float()
    rk = torch.as_tensor(ranks).long()
    if lp.ndim != 2 or rk.shape != (lp.shape[0],):
        raise ValueError(f"expected topk_logprobs [N, k] and ranks [N], got {tuple(lp.shape)} and {tuple(rk.shape)}")
    if lp.shape[0] == 0:
        raise ValueError("no positions to calibrate on")
    if int(rk.min()) < -1 or int(rk.max()) >= lp.shape[1]:
        raise ValueError(f"ranks must lie in [-1, {lp.shape[1]}): -1 = target outside the top-k")
    return lp, rk


def top_label(topk_logprobs, ranks, form: Optional[str] = None, value: float = 1.0) -> dict:
    """The calibrated quantities at each position (see the module docstring).

    Args:
        topk_logprobs: [N, k] raw top-k log-probs (-inf at the padding columns of variable-k rows, which get
            probability 0); ranks: [N] column of the target, -1 if outside.
        form, value: the temperature, as in `teacher_distribution` (None = renormalised top-k).
    Returns:
        dict of float64 numpy [N]: "confidence" (max prob), "correct" (argmax column == rank, first
        column on ties), "p_target" (prob of the target; 0 when it is outside the top-k).
    """
    lp, rk = _check_inputs(topk_logprobs, ranks)
    probs = teacher_distribution(lp, form, value)
    confidence, pred = probs.max(dim=-1)
    inside = rk >= 0
    p_target = torch.where(inside, probs.gather(1, rk.clamp(min=0)[:, None])[:, 0], torch.zeros(()))
    return {"confidence": confidence.double().numpy(), "correct": (pred == rk).double().numpy(),
            "p_target": p_target.double().numpy()}


def top_label_ece(topk_logprobs, ranks, form: Optional[str] = None, value: float = 1.0, n_bins: int = 10) -> float:
    """ECE of the top-label predictions of the top-k distribution after temperature, over all N positions."""
    stats = top_label(topk_logprobs, ranks, form, value)
    # fp32 softmax can round a certain prediction a hair above 1.
    return metrics.expected_calibration_error(np.clip(stats["confidence"], 0.0, 1.0), stats["correct"], n_bins)


def conditional_nll(topk_logprobs, ranks, form: Optional[str] = None, value: float = 1.0) -> float:
    """Mean -log p(target) in nats over the positions whose target is in the top-k (see module docstring).

    Raises ValueError when no target is in the top-k (the NLL is then undefined)."""
    lp, rk = _check_inputs(topk_logprobs, ranks)
    inside = rk >= 0
    if not bool(inside.any()):
        raise ValueError("no position has its target in the top-k: the top-k NLL is undefined")
    probs = teacher_distribution(lp[inside], form, value)
    p = probs.gather(1, rk[inside][:, None])[:, 0].double()
    return float(-torch.log(p.clamp(min=metrics.NLL_EPS)).mean())


def score(topk_logprobs, ranks, form: Optional[str], value: float, objective: str, n_bins: int = 10) -> float:
    """The calibration objective ("ece" or "nll") of one temperature."""
    if objective == "ece":
        return top_label_ece(topk_logprobs, ranks, form, value, n_bins)
    if objective == "nll":
        return conditional_nll(topk_logprobs, ranks, form, value)
    raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")


@dataclass
class Fit:
    """A fitted temperature: `value` of `form`, its objective `score`, and every point tried (grid searches)."""

    form: str
    value: float
    objective: str
    score: float
    tried: dict = dataclasses.field(default_factory=dict)


def grid_scores(values, objective_fn: Callable[[float], float], tried: Optional[dict] = None) -> dict:
    """{value: objective} for every value of `values` not already in `tried` (which is extended)."""
    tried = {} if tried is None else tried
    for v in values:
        v = float(v)
        if v not in tried:
            tried[v] = float(objective_fn(v))
    return tried


def grid_best(tried: dict) -> float:
    """The value of lowest objective in {value: objective}; ties go to the larger value (flatter)."""
    if not tried:
        raise ValueError("empty grid")
    return min(tried, key=lambda v: (tried[v], -v))


def prob_grid() -> tuple[float, ...]:
    """The coarse FIRST grid for c: 0.1, 0.2, ..., 1.0."""
    return PROB_COARSE_GRID


def prob_fine_grid(best: float) -> tuple[float, ...]:
    """Steps of 0.02 within +-0.1 of `best`, kept in (0, 1] (the domain of the coarse search)."""
    steps = round(PROB_FINE_RADIUS / PROB_FINE_STEP)
    points = (round(best + PROB_FINE_STEP * j, 10) for j in range(-steps, steps + 1))
    return tuple(sorted({p for p in points if 0.0 < p <= 1.0}))


def logit_grid() -> np.ndarray:
    """41 log-spaced T over [0.05, 20]; the middle point is exactly 1."""
    grid = np.geomspace(*LOGIT_BOUNDS, LOGIT_COARSE_POINTS)
    grid[LOGIT_COARSE_POINTS // 2] = 1.0
    return grid


def logit_fine_grid(coarse: np.ndarray, best: float) -> np.ndarray:
    """21 log-spaced T between the coarse neighbours of `best`."""
    i = int(np.argmin(np.abs(np.log(coarse) - math.log(best))))
    lo, hi = coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)]
    return np.geomspace(lo, hi, LOGIT_FINE_POINTS)


def fit_prob_temperature(topk_logprobs, ranks, objective: str = "ece", n_bins: int = 10) -> Fit:
    """FIRST's c for softmax(p / c): coarse grid 0.1..1.0, then steps of 0.02 around the best."""
    fn = lambda c: score(topk_logprobs, ranks, "prob", c, objective, n_bins)  # noqa: E731
    tried = grid_scores(prob_grid(), fn)
    tried = grid_scores(prob_fine_grid(grid_best(tried)), fn, tried)
    best = grid_best(tried)
    return Fit("prob", best, objective, tried[best], dict(sorted(tried.items())))


def fit_logit_temperature(topk_logprobs, ranks, objective: str = "nll", n_bins: int = 10) -> Fit:
    """T for softmax(logprob / T): bounded NLL minimisation on log T, or a log-spaced ECE grid."""
    if objective == "nll":
        from scipy.optimize import minimize_scalar

        lp, rk = _check_inputs(topk_logprobs, ranks)
        inside = rk >= 0
        if not bool(inside.any()):
            raise ValueError("no position has its target in the top-k: cannot fit T by NLL; use --objective ece")
        lp, rk = lp[inside], rk[inside]  # fit on these rows only: the rest do not depend on T
        result = minimize_scalar(lambda log_t: conditional_nll(lp, rk, "logit", math.exp(log_t)),
                                 bounds=tuple(math.log(b) for b in LOGIT_BOUNDS), method="bounded",
                                 options={"xatol": 1e-5})
        value = float(math.exp(result.x))
        return Fit("logit", value, "nll", float(result.fun))
    fn = lambda t: score(topk_logprobs, ranks, "logit", t, objective, n_bins)  # noqa: E731
    coarse = logit_grid()
    tried = grid_scores(coarse, fn)
    tried = grid_scores(logit_fine_grid(coarse, grid_best(tried)), fn, tried)
    best = grid_best(tried)
    return Fit("logit", best, objective, tried[best], dict(sorted(tried.items())))


def fit_temperature(topk_logprobs, ranks, form: str, objective: Optional[str] = None, n_bins: int = 10) -> Fit:
    """Fit `form` ("prob" or "logit") with `objective` (default: ece for prob, nll for logit)."""
    objective = objective or DEFAULT_OBJECTIVE.get(form)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")
    if form == "prob":
        return fit_prob_temperature(topk_logprobs, ranks, objective, n_bins)
    if form == "logit":
        return fit_logit_temperature(topk_logprobs, ranks, objective, n_bins)
    raise ValueError(f"unknown temperature form {form!r}: use 'prob' or 'logit'")


# ----------------------------------------------------------------------------------------------
# Store I/O
# ----------------------------------------------------------------------------------------------


def read_positions(store, desc: str = "reading") -> tuple[torch.Tensor, np.ndarray]:
    """Every target position of a store as fitting input.

    Returns:
        (topk_logprobs [N, k] float32 torch, raw, temperature 1; ranks [N] int64 numpy, the column of
        the target token input_ids[pos + 1] in the row's top-k ids, -1 when outside).
    """
    group = store.group
    seq_offsets = group["seq_offsets"][:]
    pos_offsets = group["pos_offsets"][:]
    n = int(pos_offsets[-1])
    logprobs = np.empty((n, store.k), dtype=np.float32)
    ranks = np.empty(n, dtype=np.int64)
    bar = tqdm(total=n, unit="pos", desc=desc, dynamic_ncols=True, leave=False)
    for lo in range(0, n, _READ_BLOCK):
        hi = min(lo + _READ_BLOCK, n)
        rows = np.arange(lo, hi)
        seq = np.searchsorted(pos_offsets, rows, side="right") - 1
        try:
            token_index = seq_offsets[seq] + group["target_positions"][lo:hi].astype(np.int64) + 1
            # Rows are in sequence order, so their target tokens lie in one contiguous token range.
            t0, t1 = int(token_index.min()), int(token_index.max()) + 1
            targets = group["input_ids"][t0:t1].astype(np.int64)[token_index - t0]
            ids, logprobs[lo:hi] = read_rows(group, lo, hi)  # padding of a top-p store: id -1, log-prob -inf
            ranks[lo:hi] = target_rank(ids, targets)
        except Exception as e:  # a torn chunk fails its checksum here
            bar.close()
            raise FirstKDError(damaged_store_message(store.path, f"{type(e).__name__}: {e}")) from None
        bar.update(hi - lo)
    bar.close()
    return torch.from_numpy(logprobs), ranks


def damaged_store_message(path, why) -> str:
    """The one-line error of a store found damaged while calibrating (`why` is the first problem)."""
    why = " ".join(str(why).split())[:200]
    return (f"store {path} is damaged ({why}): nothing was written; run `first-kd inspect {path}` and "
            "re-create it with `first-kd cache ... --overwrite`")


def same_teacher(train, val) -> str:
    """Refuse stores cached from different teachers; returns a note when that could only be judged by name.

    Stores record a fingerprint of the teacher's weights (`teacher.weights`, see first_kd.commands.cache): when
    both have one, it decides, whatever path or name the teacher was loaded by. Stores without one (cached
    by an older first-kd, or a teacher without safetensors files) fall back to the name and revision.
    """
    t_teacher, v_teacher = train.attrs.get("teacher") or {}, val.attrs.get("teacher") or {}
    t_weights, v_weights = t_teacher.get("weights") or {}, v_teacher.get("weights") or {}
    if t_weights.get("sha256") and t_weights.get("method") == v_weights.get("method"):
        if t_weights["sha256"] != v_weights.get("sha256"):
            raise FirstKDError(
                f"the stores come from teachers with different weights ({t_teacher.get('name')!r}, weights "
                f"{t_weights['sha256'][:12]} in {train.path}; {v_teacher.get('name')!r}, weights "
                f"{str(v_weights.get('sha256'))[:12]} in {val.path}): cache the held-out data with the same teacher")
        return ""
    for key in ("name", "revision"):
        if t_teacher.get(key) != v_teacher.get(key):
            raise FirstKDError(
                f"the stores come from different teachers ({key} {t_teacher.get(key)!r} in {train.path}, "
                f"{v_teacher.get(key)!r} in {val.path}): cache the held-out data with the same teacher")
    without = [str(s.path) for s, w in ((train, t_weights), (val, v_weights)) if not w.get("sha256")]
    return (f"note: {' and '.join(without) or 'the stores'} record no comparable fingerprint of the teacher's "
            f"weights (older first-kd, or no safetensors files), so the teacher was matched by name "
            f"({t_teacher.get('name')!r}) only; re-cache with this first-kd to have the weights compared")


def check_pair(train, val) -> str:
    """Refuse a held-out store that cannot calibrate the training store (one-line FirstKDError); returns a
    note for the user ('' or one line) when the teacher could be matched by name only."""
    ta, va = train.attrs, val.attrs
    note = same_teacher(train, val)
    if (ta.get("tokenizer") or {}).get("sha256") != (va.get("tokenizer") or {}).get("sha256"):
        raise FirstKDError(f"{train.path} and {val.path} were cached with different tokenizers: cache the "
                           "held-out data with the training store's teacher and tokenizer")
    if train.k != val.k:
        raise FirstKDError(f"{train.path} keeps top-{train.k} but {val.path} top-{val.k}: a temperature is fitted "
                           "for one k; cache the held-out data with the same --k")
    t_data, v_data = ta.get("data") or {}, va.get("data") or {}
    if t_data.get("format") != v_data.get("format"):
        raise FirstKDError(f"{train.path} holds {t_data.get('format')} data but {val.path} holds "
                           f"{v_data.get('format')}: fit on held-out data of the same kind")
    if t_data.get("fingerprint") and t_data.get("fingerprint") == v_data.get("fingerprint"):
        raise FirstKDError(f"--val-store {val.path} holds the same data as --store {train.path}: never fit the "
                           "temperature on the training split; cache a held-out split (e.g. --split validation)")
    return note


def _level(store) -> str:
    return "answer" if (store.attrs.get("data") or {}).get("format") == "mcqa" else "token"


def fit_store(val, form: str, objective: Optional[str], n_bins: int) -> dict:
    """Fit on a store's positions; the temperature record (without the written-where fields)."""
    logprobs, ranks = read_positions(val, desc=f"reading {val.path.name}")
    if logprobs.shape[0] == 0:
        raise FirstKDError(f"{val.path} holds no target positions: cache a non-empty held-out split")
    n_inside = int((ranks >= 0).sum())
    objective = objective or DEFAULT_OBJECTIVE[form]
    if n_inside == 0 and objective == "nll":
        raise FirstKDError(f"no target token of {val.path} is in the teacher's top-{val.k}: NLL is undefined; "
                           "use --objective ece")
    fit = fit_temperature(logprobs, ranks, form, objective, n_bins)
    nll = (lambda f, v: conditional_nll(logprobs, ranks, f, v)) if n_inside else (lambda f, v: None)
    return {
        "form": form,
        "value": fit.value,
        "objective": objective,
        "ece_before": top_label_ece(logprobs, ranks, None, 1.0, n_bins),
        "ece_after": top_label_ece(logprobs, ranks, form, fit.value, n_bins),
        "nll_before": nll(None, 1.0),
        "nll_after": nll(form, fit.value),
        "n_positions": int(logprobs.shape[0]),
        "n_nll_positions": n_inside,
        "n_bins": n_bins,
        "level": _level(val),
        "other_bucket": False,
    }
