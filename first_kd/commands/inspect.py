"""`first-kd inspect STORE`: verify a top-k store chunk by chunk and summarise it (or print --json).

Exit codes: 0 for a complete, consistent store; 1 for an incomplete store or one whose calibration was
interrupted half-way (the summary is still printed, and stderr says how to finish it); 2 (a one-line
error) for a damaged, missing or foreign store. The checks themselves are first_kd.store.verify.

Coverage (first_kd.coverage): the distribution of the top-k mass over the store's positions (recorded by
`cache`, or measured here for stores written before it was), the teacher's top-j mass curve when `cache
--probe-k` measured one, and the k that reaches `--coverage`. `--plot PATH` draws them as a PNG; inspect
writes nothing unless asked.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from first_kd import coverage
from first_kd.config import option
from first_kd.errors import FirstKDError
from first_kd.store import DamagedStore, describe_selection, resume_hint, verify


@dataclasses.dataclass
class InspectConfig:
    store: str = option(help="path of the store to verify", positional=True)
    json: bool = option(False, help="print machine-readable JSON instead of the human summary")
    coverage: float = option(coverage.DEFAULT_TARGET,
                             help="the share of the teacher's probability the top-k should keep: inspect says "
                                  "whether the store's k keeps it and, from a `cache --probe-k` curve, which k does")
    plot: Optional[str] = option(None, help="write the coverage figure (histogram of the top-k mass; the probe's "
                                            "top-j mass curve when there is one) as a PNG at this path")

    def validate(self):
        if not self.store:
            raise FirstKDError("give the store path: first-kd inspect STORE")
        if not 0 < self.coverage <= 1:
            raise FirstKDError(f"--coverage is a share of probability in (0, 1], got {self.coverage}")
        if self.plot:
            store, plot = Path(self.store).resolve(), Path(self.plot).resolve()
            if plot == store or store in plot.parents:
                raise FirstKDError(f"--plot {self.plot} is inside the store {self.store}: write it elsewhere "
                                   "(a store holds only its own files)")


def summary_text(summary: dict, target: float = coverage.DEFAULT_TARGET) -> str:
    """The human summary of a `verify` summary dict, one aspect a line; `target` is --coverage."""
    t = summary["temperature"]
    temp = f"{t['form']} {t['value']:.4g} (ECE {t.get('ece_before', float('nan')):.4f} -> " \
           f"{t.get('ece_after', float('nan')):.4f})" if t else "none (run first-kd calibrate)"
    if t.get("fit_id"):
        temp += f", fit {t['fit_id']}"
    if summary.get("temperature_pending"):
        temp = "HALF-WRITTEN (an interrupted `first-kd calibrate`: re-run it to finish)"
    teacher = summary.get("teacher") or {}
    engine = teacher.get("engine") or {"name": "hf"}  # stores from before engines were recorded: hf
    layout = engine.get("settings") or {}
    engine_text = engine["name"] + (f" {engine['version']}" if engine.get("version") else "")
    if layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1) > 1:
        engine_text += f", TP {layout['tensor_parallel_size']} x PP {layout['pipeline_parallel_size']}"
    lines = [
        f"store      {summary['path']}",
        f"status     {'complete' if summary['complete'] else 'INCOMPLETE'} "
        f"({summary['units_done']}/{summary['n_units']} units written)",
        f"teacher    {teacher.get('name')} (dtype {teacher.get('dtype')}, engine {engine_text})",
        f"data       {summary['n_sequences']:,} sequences, {summary['n_tokens']:,} tokens, "
        f"{summary['n_positions']:,} target positions ({(summary.get('data') or {}).get('format')})",
        f"rows       {describe_selection(summary['selection'])}: {summary['mean_ids_per_position']:.2f} ids/position "
        f"(width {summary['k']}), vocab {summary['vocab_size']:,}",
        f"disk       {summary['bytes_on_disk'] / 1e6:.2f} MB; {summary['bytes_per_position']:.2f} bytes/position "
        f"(top-k), {summary['bytes_per_position_total']:.2f} with inputs",
    ]
    lines += coverage_lines(summary, target)
    lines.append(f"temperature {temp}")
    return "\n".join(lines)


def _probe_hint(summary: dict) -> str:
    """How to measure the k a coverage needs, for this store."""
    k = summary["k"]
    probe_k = min(max(64, 4 * k), 1024)
    engine = ((summary.get("teacher") or {}).get("engine") or {}).get("name", "hf")
    if engine == "vllm":
        return (f"probe a sample with the hf engine to find the k that does (`first-kd cache --engine hf --limit 500 "
                f"--probe-k {probe_k} --out probe.zarr`)")
    return (f"re-run the same `first-kd cache` command with --probe-k {probe_k} to find the k that does (on this "
            "complete store it runs the probe alone)")


def coverage_lines(summary: dict, target: float) -> list[str]:
    """The coverage lines of the human summary: the top-k mass distribution, the probe, the suggested k."""
    cov, probe = summary.get("coverage"), summary.get("coverage_probe")
    if not cov:
        return []
    q = cov["quantiles"]
    origin = "" if summary.get("coverage_recorded") else " (measured now: the store predates recorded coverage)"
    selection = summary.get("selection") or {"kind": "top-k", "k": cov["k"]}
    kept = f"top-{cov['k']}" if selection["kind"] == "top-k" else f"kept ({describe_selection(selection)})"
    lines = [f"coverage   {kept} mass: mean {cov['mean']:.4f}, "
             + ", ".join(f"{name} {value:.4f}" for name, value in q.items()) + f", min {cov['min']:.4f}{origin}"]
    if probe:
        shown = sorted({1, cov["k"], probe["k"]} | {j for j in (2, 10, 20, 50, 100, 200, 500) if j < probe["k"]})
        lines.append(f"probe      top-j mass on {probe['n_positions']:,} positions ({probe['n_sequences']:,} sequences), "
                     "mean (p10): " + ", ".join(f"j={j} {probe['mean'][j - 1]:.4f} ({probe['quantiles']['p10'][j - 1]:.4f})"
                                                for j in shown))
    if selection["kind"] == "sampled":  # a sample's mass is not a choice of k
        return lines
    verdict = coverage.coverage_verdict(cov, probe, target)
    lines.append(f"suggest    {suggestion_text(verdict, summary)}")
    return lines


def suggestion_text(verdict: dict, summary: dict) -> str:
    """One line: whether the store's k keeps `target` of the teacher's mass, and which k does."""
    t, k, mean, p10 = verdict["target"], verdict["k"], verdict["mean"], verdict["p10"]
    if verdict["probe_k"] is not None:
        K = verdict["probe_k"]
        p10_k = f"k={verdict['k_p10']}" if verdict["k_p10"] else f"more than {K}"
        if verdict["k_mean"]:
            found = f"k={verdict['k_mean']} keeps {t:g} of the teacher's mass on average (at p10: {p10_k})"
        else:
            found = (f"no k <= {K} keeps {t:g} of the teacher's mass on average (top-{K} mean "
                     f"{(summary.get('coverage_probe') or {}).get('mean', [float('nan')])[-1]:.4f}): probe with a "
                     "larger --probe-k")
        return f"{found}; this store's k={k} keeps mean {mean:.4f}, p10 {p10:.4f}"
    if verdict["reaches_p10"]:
        return f"k={k} keeps {t:g} of the teacher's mass on average and at p10 (mean {mean:.4f}, p10 {p10:.4f})"
    if verdict["reaches_mean"]:
        now = f"k={k} keeps {t:g} of the teacher's mass on average (mean {mean:.4f}) but not at p10 ({p10:.4f})"
    else:
        now = f"k={k} does not keep {t:g} of the teacher's mass (mean {mean:.4f}, p10 {p10:.4f})"
    return f"{now}; {_probe_hint(summary)}"


def run_inspect(cfg: InspectConfig) -> int:
    """Print the summary; the exit code of the module docstring."""
    try:
        summary = verify(cfg.store)
    except DamagedStore as e:
        if cfg.json:
            print(json.dumps({"path": cfg.store, "damaged": str(e), "complete": False}))
        raise FirstKDError(f"store {cfg.store} is damaged: {e}; re-create it with `first-kd cache ... --overwrite`")
    if summary.get("coverage"):
        summary["coverage_verdict"] = coverage.coverage_verdict(summary["coverage"], summary.get("coverage_probe"),
                                                                cfg.coverage)
    print(json.dumps(summary) if cfg.json else summary_text(summary, cfg.coverage))
    _plot(cfg, summary)
    if not summary["complete"]:
        print(f"first-kd inspect: store {cfg.store} is incomplete: {resume_hint(cfg.store)}", file=sys.stderr)
        return 1
    if summary["temperature_pending"]:
        print(f"first-kd inspect: {summary['temperature_pending']}", file=sys.stderr)
        return 1
    return 0


def _plot(cfg: InspectConfig, summary: dict) -> None:
    """--plot: the coverage figure (first_kd.plots.coverage_figure) as a PNG."""
    if not cfg.plot:
        return
    if not summary.get("coverage"):
        print(f"first-kd inspect: no coverage plot: store {cfg.store} is incomplete", file=sys.stderr)
        return
    from first_kd.plots import save_coverage_figure

    save_coverage_figure(summary["coverage"], cfg.plot, summary.get("coverage_probe"), cfg.coverage, title=cfg.store)
    print(f"first-kd inspect: wrote the coverage plot {cfg.plot}", file=sys.stderr if cfg.json else sys.stdout)
