"""`first-kd inspect STORE`: verify a top-k store chunk by chunk and summarise it (or print --json).

Exit codes: 0 for a complete, consistent store; 1 for an incomplete store or one whose calibration was
interrupted half-way (the summary is still printed, and stderr says how to finish it); 2 (a one-line
error) for a damaged, missing or foreign store. The checks themselves are first_kd.store.verify.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from first_kd.config import option
from first_kd.errors import FirstKDError
from first_kd.store import DamagedStore, resume_hint, verify


@dataclasses.dataclass
class InspectConfig:
    store: str = option(help="path of the store to verify", positional=True)
    json: bool = option(False, help="print machine-readable JSON instead of the human summary")

    def validate(self):
        if not self.store:
            raise FirstKDError("give the store path: first-kd inspect STORE")


def summary_text(summary: dict) -> str:
    """The human summary of a `verify` summary dict, one aspect a line."""
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
        f"top-k      k={summary['k']}, vocab {summary['vocab_size']:,}",
        f"disk       {summary['bytes_on_disk'] / 1e6:.2f} MB; {summary['bytes_per_position']:.2f} bytes/position "
        f"(top-k), {summary['bytes_per_position_total']:.2f} with inputs",
    ]
    if summary["mean_topk_mass"] is not None:
        lines.append(f"mass       mean top-{summary['k']} mass {summary['mean_topk_mass']:.4f}, "
                     f"p10 {summary['topk_mass_p10']:.4f}")
    lines.append(f"temperature {temp}")
    return "\n".join(lines)


def run_inspect(cfg: InspectConfig) -> int:
    """Print the summary; the exit code of the module docstring."""
    try:
        summary = verify(cfg.store)
    except DamagedStore as e:
        if cfg.json:
            print(json.dumps({"path": cfg.store, "damaged": str(e), "complete": False}))
        raise FirstKDError(f"store {cfg.store} is damaged: {e}; re-create it with `first-kd cache ... --overwrite`")
    print(json.dumps(summary) if cfg.json else summary_text(summary))
    if not summary["complete"]:
        print(f"first-kd inspect: store {cfg.store} is incomplete: {resume_hint(cfg.store)}", file=sys.stderr)
        return 1
    if summary["temperature_pending"]:
        print(f"first-kd inspect: {summary['temperature_pending']}", file=sys.stderr)
        return 1
    return 0
