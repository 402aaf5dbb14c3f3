"""`first-kd calibrate`: fit the teacher temperature on a held-out store and record it in both stores.

The fit itself (what is calibrated, the forms and objectives) is first_kd.calibration; how the pair of
stores is written so that it never silently disagrees is first_kd.store.record_fit. This command adds
what makes it safe to run again: both stores locked, both verified before anything is written, the same
settings on a pair that already holds their fit a no-op (`--overwrite` refits), and an interrupted
calibration finished with the fit it was writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import sys
import uuid
from pathlib import Path
from typing import Literal, Optional

from first_kd.calibration import DEFAULT_OBJECTIVE, LOGIT_BOUNDS, MAX_BINS, PROB_COARSE_GRID, check_pair, \
    damaged_store_message, fit_store
from first_kd.config import option
from first_kd.errors import FirstKDError
from first_kd.outputs import exclusive_lock, say_done
from first_kd.store import PENDING_KEY, DamagedStore, TopKStore, clear_partials, open_store, record_fit, verify


@dataclasses.dataclass
class CalibrateConfig:
    store: Optional[str] = option(None, help="training store whose teacher temperature is fitted (the record is "
                                             "written here, and read by `distill --loss first`)")
    val_store: Optional[str] = option(None, help="held-out store cached with the same teacher; the fit uses only "
                                                 "this one")
    form: Literal["prob", "logit"] = option(
        "prob", help="prob: FIRST's softmax(p / c) over top-k probabilities; logit: softmax(logprob / T)")
    objective: Optional[Literal["ece", "nll"]] = option(
        None, help="what the fit minimises; default ece for --form prob (as FIRST), nll for --form logit")
    n_bins: int = option(10, help="equal-width confidence bins of the ECE")
    overwrite: bool = option(False, help="fit again even when both stores already hold a fit with these settings")

    def validate(self):
        if not self.store:
            raise FirstKDError("missing --store (the training store to calibrate)")
        if not self.val_store:
            raise FirstKDError("missing --val-store (a held-out store cached with the same teacher, e.g. "
                               "`first-kd cache --split validation`); the temperature is never fitted on training data")
        if not 1 <= self.n_bins <= MAX_BINS:
            raise FirstKDError(f"--n-bins must be between 1 and {MAX_BINS}, got {self.n_bins}: ECE is usually "
                               "measured with 10-20 bins (FIRST uses 10)")


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary_text(record: dict, train_path, val_path) -> str:
    """The one-screen summary `first-kd calibrate` prints."""
    symbol = "c" if record["form"] == "prob" else "T"
    level = "answer positions" if record["level"] == "answer" else "target tokens"
    lines = [
        f"first-kd calibrate: {record['form']} temperature {symbol} = {record['value']:.4g} "
        f"(objective {record['objective']})",
        f"  fitted on {val_path}: {record['n_positions']:,} {level}, "
        f"{record['n_nll_positions']:,} with the target in the top-k (the NLL's positions)",
        f"  {'':8} {'ECE':>8} {'NLL':>8}",
        f"  {'before':8} {_fmt(record['ece_before']):>8} {_fmt(record['nll_before']):>8}   (raw top-k)",
        f"  {'after':8} {_fmt(record['ece_after']):>8} {_fmt(record['nll_after']):>8}",
        f"  recorded in {train_path} and {val_path}",
    ]
    edge = {"prob": (min(PROB_COARSE_GRID), max(PROB_COARSE_GRID)), "logit": LOGIT_BOUNDS}[record["form"]]
    if record["value"] <= edge[0] * 1.001 or record["value"] >= edge[1] / 1.001:
        if record["form"] == "logit":
            hint = "check the held-out data"
        elif record["value"] <= edge[0] * 1.001:
            hint = "the raw top-k is under-confident here; --form logit searches sharper temperatures too"
        else:
            hint = "--form logit can flatten further"
        lines.append(f"  note: {symbol} = {record['value']:.4g} is at or beyond the edge of the coarse grid "
                     f"{edge[0]:g}..{edge[1]:g}, so the optimum may lie beyond it ({hint})")
    if record["ece_after"] > record["ece_before"]:
        lines.append("  note: this temperature does not lower ECE on the held-out data (the raw teacher may "
                     "already be calibrated at this level); consider --form logit or training with --loss kd")
    return "\n".join(lines)


def fit_settings(cfg: CalibrateConfig, val) -> dict:
    """What makes two fits the same fit: the request and the held-out data it is fitted on."""
    return {"form": cfg.form, "objective": cfg.objective or DEFAULT_OBJECTIVE[cfg.form], "n_bins": cfg.n_bins,
            "val data": (val.attrs.get("data") or {}).get("fingerprint")}


def _settings_of(record: dict) -> dict:
    return {"form": record.get("form"), "objective": record.get("objective"), "n_bins": record.get("n_bins"),
            "val data": (record.get("fitted_on") or {}).get("fingerprint")}


def recorded_fit(train, val, settings: dict) -> Optional[dict]:
    """The fit both stores already hold with these settings, none half-written; else None.

    The held-out store may hold a later fit of another store against it (a test store calibrated on
    the same held-out data): with the same settings on the same data it is the same value, so that counts."""
    t_record, v_record = train.attrs.get("temperature") or {}, val.attrs.get("temperature") or {}
    if train.attrs.get(PENDING_KEY) or not t_record.get("fit_id") or _settings_of(t_record) != settings:
        return None
    if t_record["fit_id"] != v_record.get("fit_id") and (
            _settings_of(v_record) != settings or v_record.get("value") != t_record.get("value")):
        return None
    return t_record


def _pending_fit(train, settings: dict) -> Optional[dict]:
    """The fit an interrupted run of these settings was writing, to finish it without refitting."""
    pending = train.attrs.get(PENDING_KEY) or {}
    return pending if pending.get("fit_id") and _settings_of(pending) == settings else None


def _open_verified(path) -> TopKStore:
    """Open a store for calibration, every chunk read and checked: a damaged store is one line."""
    store = open_store(path)
    try:
        verify(path)
    except DamagedStore as e:
        raise FirstKDError(damaged_store_message(path, e)) from None
    return store


def new_record(cfg: CalibrateConfig, val) -> dict:
    """Fit on the held-out store; the full record written to both stores."""
    data = val.attrs.get("data") or {}
    record = fit_store(val, cfg.form, cfg.objective, cfg.n_bins)
    record["fitted_on"] = {"path": str(cfg.val_store), "fingerprint": data.get("fingerprint"),
                           "source": data.get("source"), "split": data.get("split")}
    record["fitted_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    record["fit_id"] = uuid.uuid4().hex[:16]
    record["stores"] = {"train": str(cfg.store), "val": str(cfg.val_store)}
    return record


def run_calibrate(cfg: CalibrateConfig) -> int:
    """Fit on --val-store and record the fit in both stores (or say the same fit is already there)."""
    for path in (cfg.store, cfg.val_store):  # missing, foreign, incomplete: refused before taking any lock
        open_store(path)
    with contextlib.ExitStack() as locks:
        for path in sorted({str(Path(cfg.store).resolve()), str(Path(cfg.val_store).resolve())}):
            locks.enter_context(exclusive_lock(Path(path), "calibrate"))
        train, val = open_store(cfg.store), open_store(cfg.val_store)  # as they are now that we hold them
        note = check_pair(train, val)
        settings = fit_settings(cfg, val)
        if not cfg.overwrite and recorded_fit(train, val, settings):
            return say_done("calibrate", f"{cfg.store} (with {cfg.val_store})", "a temperature fit")
        record = None if cfg.overwrite else _pending_fit(train, settings)
        train, val = _open_verified(cfg.store), _open_verified(cfg.val_store)
        if note:
            print(f"first-kd calibrate: {note}", file=sys.stderr)
        if record:
            print(f"first-kd calibrate: finishing the interrupted calibration of {cfg.store} (fit "
                  f"{record['fit_id']})", file=sys.stderr)
        else:
            record = new_record(cfg, val)
        for path in (cfg.store, cfg.val_store):
            clear_partials(path)  # left by zarr attribute writes of older first-kd versions, if killed
        # The training store is marked first and completed last: see first_kd.store.record_fit.
        record_fit(cfg.store, cfg.val_store, record)
    print(summary_text(record, cfg.store, cfg.val_store))
    return 0
