"""What every demo suite does with its commands: the layout of DIR, the steps, and running them.

A suite describes its pipeline as a list of `Step`s (one `first-kd` command each, with a test of whether
its work is already done) and hands it to `run_steps`, which refuses a DIR made with other options,
records the options (demo.yaml) and the commands (commands.sh), builds the suite's inputs and runs every
step not done yet through the CLI entry, first_kd.cli.main, timing each one.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from first_kd import cli
from first_kd.config import to_dict
from first_kd.errors import FirstKDError
from first_kd.files import write_text_atomic
from first_kd.outputs import settings_diff

# Options that may change between runs on one DIR: where it is, and how many threads ran it.
RERUN_FREE_OPTIONS = ("out", "threads")


@dataclass
class Step:
    """One `first-kd` command of the pipeline and how to tell that its work is already done."""

    name: str
    argv: list[str]
    done: Callable[[], bool]
    comment: str = ""
    # What to change when the command fails because of the demo's own settings (said before the generic
    # "fix the problem above"), e.g. a teacher too briefly trained for a filter to keep anything.
    on_failure: str = ""

    @property
    def shell(self) -> str:
        return "first-kd " + shlex.join(self.argv)


class Layout:
    """Where everything lives under DIR."""

    def __init__(self, out: str):
        self.root = Path(out)
        self.data = self.root / "data"
        self.models = self.root / "models"
        self.stores = self.root / "stores"
        self.runs = self.root / "runs"
        self.evals = self.root / "eval"

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    def store(self, name: str) -> Path:
        return self.stores / f"{name}.zarr"


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise FirstKDError with the message of the first (holds, message) check that does not hold."""
    for ok, message in checks:
        if not ok:
            raise FirstKDError(message)


# ----------------------------------------------------------------------------------------------
# Reading and writing what the steps use and leave
# ----------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when there is no such file (a step not run)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def store_complete(path: Path) -> bool:
    """Whether `first-kd cache` finished the store at `path`."""
    from first_kd.store import is_store

    if not is_store(path):
        return False
    import zarr

    return bool(zarr.open_group(str(path), mode="r").attrs.get("complete"))


def store_temperature(path: Path) -> dict:
    """The temperature record `first-kd calibrate` left in a complete store ({} = none)."""
    import zarr

    if not store_complete(path):
        return {}
    return dict(zarr.open_group(str(path), mode="r").attrs.get("temperature") or {})


def calibrated_from(path: Path, val: Path) -> bool:
    """Whether the store at `path` records a temperature fitted on the store at `val`."""
    record = store_temperature(path)
    return bool(record) and (record.get("fitted_on") or {}).get("path") == str(val)


def teacher_step(cfg, lay: Layout, comment: str) -> Step:
    """Every suite's first step: `distill --loss ce` fine-tunes the untrained teacher on its own split."""
    return Step(
        "teacher", ["distill", "--student", str(lay.models / "teacher-init"), "--data", str(lay.split("teacher")),
                    "--loss", "ce", "--out", str(lay.runs / "teacher"), "--max-steps", str(cfg.teacher_steps),
                    "--lr", str(cfg.teacher_lr), "--batch-size", str(cfg.batch_size), "--schedule", cfg.schedule,
                    "--seed", str(cfg.seed), "--save-every", "0"],
        lambda: (lay.runs / "teacher" / "summary.json").is_file(),
        comment)


# ----------------------------------------------------------------------------------------------
# Running the steps
# ----------------------------------------------------------------------------------------------


def check_out_dir(cfg, lay: Layout) -> None:
    """Refuse a DIR holding something else: another demo's options, or files that are not a demo's."""
    saved = lay.root / "demo.yaml"
    if saved.is_file():
        old = yaml.safe_load(saved.read_text()) or {}
        new = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
        keys = sorted(k for k in set(old) | set(new) if k not in RERUN_FREE_OPTIONS)
        diffs = settings_diff(old, new, keys)
        if diffs:
            raise FirstKDError(f"--out {cfg.out} holds a demo run with other options ({diffs}): re-run with the same "
                               "options to resume it, or choose another --out")
    elif lay.root.is_dir() and any(lay.root.iterdir()):
        raise FirstKDError(f"--out {cfg.out} is not empty and holds no demo run: choose a new or empty directory")


def write_commands(path: Path, cfg, steps: list[Step]) -> None:
    """DIR/commands.sh: every step's command line, in order, each under its comment."""
    lines = [
        "#!/usr/bin/env bash",
        f"# The first-kd commands `first-kd demo --suite {cfg.suite} --out {cfg.out}` ran, in order. Run them "
        "from the directory",
        "# the demo was run in. The data (data/*.jsonl), the tokenizer and the untrained models (models/)",
        f"# were written by the demo itself (first_kd.demo.{cfg.suite}, first_kd.tiny) before these commands.",
        "# The same command on a finished step's output says there is nothing to do and exits 0; add",
        "# --overwrite to redo one.",
        "set -euo pipefail",
        "",
    ]
    for step in steps:
        lines += [f"# {step.comment}" if step.comment else f"# {step.name}", step.shell, ""]
    path.write_text("\n".join(lines))


def run_step(step: Step, index: int, total: int, timings: dict) -> None:
    """Run one step through first_kd.cli.main unless its work is done; its seconds go to `timings`."""
    if step.done():
        print(f"\n[{index}/{total}] done already, skipped: {step.shell}", flush=True)
        return
    print(f"\n[{index}/{total}] {step.shell}", flush=True)
    started = time.perf_counter()
    code = cli.main(step.argv)
    if code != 0:
        first = f"{step.on_failure}; otherwise " if step.on_failure else ""
        raise FirstKDError(f"step '{step.name}' failed (exit {code}); {first}fix the problem above and re-run the "
                           "demo with the same options to resume")
    timings[step.name] = round(time.perf_counter() - started, 2)


def run_steps(cfg, lay: Layout, steps: list[Step], setup: Callable[[], object]):
    """What every suite does with its commands: refuse a foreign DIR, record the options and commands.sh,
    run `setup` (the suite's data and untrained models), then each step not done yet, timing them.

    Returns (what `setup` returned, {step name: seconds}); the timings also go to DIR/timings.json.
    """
    import torch

    check_out_dir(cfg, lay)
    lay.root.mkdir(parents=True, exist_ok=True)
    (lay.root / "demo.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    timings_path = lay.root / "timings.json"
    timings = read_json(timings_path)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        write_commands(lay.root / "commands.sh", cfg, steps)
        total = len(steps) + 1
        print(f"[1/{total}] data, tokenizer and untrained models in {lay.data} and {lay.models}", flush=True)
        started = time.perf_counter()
        built = setup()
        timings.setdefault("setup", round(time.perf_counter() - started, 2))
        for i, step in enumerate(steps, start=2):
            run_step(step, i, total, timings)
            timings_path.write_text(json.dumps(timings, indent=2))
    finally:
        torch.set_num_threads(threads_before)
    return built, timings


# ----------------------------------------------------------------------------------------------
# The suite's report on top of the report step's
# ----------------------------------------------------------------------------------------------


def run_facts(cfg, lay: Layout, timings: dict) -> dict:
    """What report.json says of the run itself: wall time, per-step seconds, the options and DIR."""
    return {"wall_seconds": round(sum(timings.values()), 2), "timings": timings, "demo": to_dict(cfg),
            "out": str(lay.root)}


def text_table(rows: list[tuple], left: int = 1) -> list[str]:
    """Rows of strings as aligned lines of the printed summary (indented 2): the first `left` columns
    left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def checks_table(checks: list[dict]) -> list[str]:
    """A suite's checks as the Markdown table of its report.md section."""
    return ["| Check | Value | Holds |", "|:---|---:|:---|",
            *[f"| {c['claim']} | {c['value']:.4f} | {'yes' if c['ok'] else '**no**'} |" for c in checks]]


def where_line(report: dict) -> str:
    """The summary's last line: wall time, and where the commands and the report are."""
    out = Path(report["out"])
    return f"  wall time {report['wall_seconds']:.0f} s; commands in {out / 'commands.sh'}, report in {out / 'report.md'}"


def check_lines(checks: list[dict]) -> list[str]:
    """The printed lines of a suite's checks: [ok] or [MISSED], the claim and its measured value."""
    return [f"  [{'ok' if c['ok'] else 'MISSED'}] {c['claim']} ({c['value']:.4f})" for c in checks]


def finish(lay: Layout, report: dict, markdown: str, summary: str) -> int:
    """Write the suite's report.json, append its section to report.md (the report step rewrote that just now,
    so it is appended once) and print its summary."""
    (lay.root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(lay.root / "report.md", "a") as f:
        f.write("\n" + markdown)
    print(summary, flush=True)
    return 0


def finish_with_checks(cfg, lay, timings: dict, results: dict, claims: Callable, markdown: Callable,
                       summary: Callable) -> int:
    """The end of a suite whose checks read its collected `results`: report.json gains the results, the run's
    facts and the checks, then `finish`. A missing metric is one line naming the evaluations folder."""
    report = read_json(lay.root / "report.json")
    report["results"] = results
    report.update(run_facts(cfg, lay, timings))
    try:
        report["checks"] = claims(report["results"])
    except (KeyError, TypeError) as e:
        raise FirstKDError(f"an evaluation in {lay.evals} lacks a metric the checks need ({e}); delete it and "
                           "re-run the demo with the same options") from None
    return finish(lay, report, markdown(report), summary(report))
