"""`first-kd report`: evaluation runs side by side, as report.md (readable on GitHub), report.json and
reliability diagrams.

Each RUN is a `first-kd evaluate --out` directory (or its metrics.json). The report holds:
  * report.md: a table of accuracy, ECE, MCE, Brier, NLL, mean confidence and n per run (best of each
    column in bold), the side-by-side reliability figure(s), the teacher temperature records of the runs
    that used one, and where every number came from;
  * report.json: {"title", "models": {label: metrics without the bins table}, "temperature": {label: record}};
  * reliability.png: one reliability diagram per run with shared axes, at most 6 per figure
    (reliability-2.png ... hold the rest).

A generation evaluation (`first-kd evaluate --modes slow,fast,auto`) gives one row per mode, labelled
"LABEL [mode]", and the table gains a "Mean tokens" column (generated tokens per answer).

Everything users pass in (labels, the title, paths, and the fields of a run's metrics.json) is escaped,
so report.md shows it as text: no HTML, image, link or emphasis of theirs is rendered.

Writing: the files are made in a scratch directory inside --out and moved into place when all are done
(report.json last), so a failure (full disk, bad run) leaves a previous report as it was. report.json
records what the report was made from (runs, labels, title, a digest of each metrics.json) and digests of
the files it wrote: the same command with unchanged evaluations and untouched files is a no-op (exit 0);
otherwise (or with --overwrite) the report is rebuilt: it is a view of the evaluations, remade in seconds
from them, so other runs, labels or a title replace it rather than being refused. --out may hold other
files (the demo writes its report into its own directory): only the report's files are replaced.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional
from urllib.parse import quote

from first_kd.config import option
from first_kd.errors import FirstKDError
from first_kd.files import clean_json, file_sha256, name_errors, write_json_atomic, write_text_atomic
from first_kd.outputs import exclusive_lock, fsync_dir, say_done, writable_parent
from first_kd.temperature import describe as describe_temperature

PANELS_PER_FIGURE = 6
# (metrics key, column title, "max" when higher is better, "min" when lower is, decimals)
COLUMNS = (
    ("accuracy", "Accuracy", "max", 4),
    ("ece", "ECE", "min", 4),
    ("mce", "MCE", "min", 4),
    ("brier", "Brier", "min", 4),
    ("nll", "NLL", "min", 4),
    ("mean_confidence", "Mean conf.", None, 4),
)
REQUIRED_KEYS = ("accuracy", "ece", "mce", "mean_confidence", "n", "bins")
# Shown only when some run has it (generation evaluations); no best-of-column: fewer is not "better".
TOKENS_COLUMN = ("mean_generated_tokens", "Mean tokens", None, 1)


@dataclasses.dataclass
class ReportConfig:
    runs: List[str] = option([], help="evaluation output directories (each holds metrics.json), comma-separated",
                             positional=True)
    out: Optional[str] = option(None, help="directory to write report.md, report.json and reliability.png")
    labels: List[str] = option([], help="comma-separated names for the runs, in order (default: each run's label)")
    title: str = option("first-kd evaluation report", help="report title")
    overwrite: bool = option(False, help="rebuild the report even when its evaluations and files are unchanged "
                                         "(otherwise the same command is a no-op)")

    def validate(self):
        if not self.runs:
            raise FirstKDError("no runs given: first-kd report RUN_DIR[,RUN_DIR...] --out DIR "
                               "(RUN_DIR = a `first-kd evaluate --out` directory)")
        if not self.out:
            raise FirstKDError("missing --out (directory for report.md, report.json, reliability.png)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise FirstKDError(f"--out {self.out} is a file: give a directory for report.md, report.json and the "
                               "figures")
        if self.labels and len(self.labels) != len(self.runs):
            raise FirstKDError(f"--labels names {len(self.labels)} run(s) but {len(self.runs)} were given: "
                               "give one label per run, in order")


def load_run(path) -> tuple[Path, dict]:
    """(path of metrics.json, its contents) for a run directory or a metrics.json path."""
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        hint = " (the evaluation did not finish?)" if path.is_dir() else ""
        raise FirstKDError(f"no metrics.json in {path}{hint}: give `first-kd evaluate --out` directories")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError:
        raise FirstKDError(f"{file} is not valid JSON: re-run the evaluation that wrote it") from None
    missing = [k for k in REQUIRED_KEYS if k not in data] if isinstance(data, dict) else list(REQUIRED_KEYS)
    if missing:
        raise FirstKDError(f"{file} lacks {', '.join(missing)}: it is not a `first-kd evaluate` metrics.json")
    return file, data


def expand_modes(labels: list[str], runs: list[dict], files: list[Path]) -> tuple[list[str], list[dict], list[Path]]:
    """One row per mode of a generation evaluation, labelled "LABEL [mode]", holding the run's fields
    overlaid with that mode's metrics; other runs pass through unchanged."""
    out_labels, out_runs, out_files = [], [], []
    for label, run, file in zip(labels, runs, files):
        modes = run.get("modes")
        if not isinstance(modes, dict) or not modes:
            out_labels.append(label), out_runs.append(run), out_files.append(file)
            continue
        base = {k: v for k, v in run.items() if k != "modes"}
        for mode, values in modes.items():
            missing = [k for k in REQUIRED_KEYS if k not in (values or {})]
            if missing:
                raise FirstKDError(f"{file}: mode {mode!r} lacks {', '.join(missing)}: re-run the evaluation that "
                                   "wrote it")
            out_labels.append(f"{label} [{mode}]")
            out_runs.append({**base, **values, "mode": mode})
            out_files.append(file)
    return out_labels, out_runs, out_files


def unique_labels(labels: list[str]) -> list[str]:
    """Labels made distinct by appending " (2)", " (3)" ... to repeats."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _number(value, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{decimals}f}"


# Backslash-escaped wherever they appear: the characters of CommonMark / GitHub Markdown syntax that work
# mid-line (emphasis, code, links and images, HTML and entities, tables, strikethrough, math, a heading's
# closing #s); an underscore only where it could emphasise (not inside a word: student_first stays).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>|~$&#])|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def md_text(text) -> str:
    """`text` as literal Markdown text on one line (safe in a table cell, a heading or a list item)."""
    return _MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(0), " ".join(str(text).splitlines()))


def md_code(text, in_table: bool = False) -> str:
    """`text` as an inline code span (a path): HTML and Markdown inside are not rendered; a fence longer
    than any run of backticks in it, and in a table cell the pipes escaped (GitHub splits cells first)."""
    text = " ".join(str(text).splitlines())
    if in_table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_link_target(path: str) -> str:
    """A relative path as a link destination: percent-encoded, so spaces or brackets cannot end the link."""
    return quote(path, safe="/")


def _cell(text) -> str:
    return md_text(text)


def _best(runs: list[dict], key: str, sense: Optional[str]) -> Optional[float]:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if sense is None or len(values) < 2:
        return None
    return max(values) if sense == "max" else min(values)


def _columns(runs: list[dict]) -> tuple:
    return COLUMNS + ((TOKENS_COLUMN,) if any(TOKENS_COLUMN[0] in r for r in runs) else ())


def metrics_table(labels: list[str], runs: list[dict]) -> list[str]:
    """Markdown lines of the main table; NLL cells of store runs carry a dagger (top-k scope)."""
    columns = _columns(runs)
    head = ["Model", "Source", "Temperature"] + [title for _, title, _, _ in columns] + ["n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] * 3 + ["---:"] * (len(columns) + 1)) + "|"]
    best = {key: _best(runs, key, sense) for key, _, sense, _ in columns}
    for label, run in zip(labels, runs):
        cells = [_cell(label), _cell(run.get("source", "?")), _cell(describe_temperature(run.get("temperature")))]
        for key, _, sense, decimals in columns:
            text = _number(run.get(key), decimals)
            if key == "nll" and run.get("nll_scope") not in (None, "all") and text != "n/a":
                text += " †"
            if best[key] is not None and run.get(key) == best[key]:
                text = f"**{text}**"
            cells.append(text)
        cells.append(f"{int(run['n']):,}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


FULL_VOCABULARY_COLUMNS = (("accuracy", "Accuracy", 4), ("ece", "ECE", 4), ("brier", "Brier", 4), ("nll", "NLL", 4),
                           ("mean_confidence", "Mean conf.", 4), ("mean_options_mass", "Mass on options", 4))


def full_vocabulary_table(labels: list[str], runs: list[dict]) -> list[str]:
    """Markdown lines scoring multiple-choice runs on the model's own next-token probabilities (not
    renormalised over the options); [] when no run has them."""
    rows = [(label, run["full_vocabulary"]) for label, run in zip(labels, runs) if run.get("full_vocabulary")]
    if not rows:
        return []
    head = ["Model"] + [title for _, title, _ in FULL_VOCABULARY_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "|".join(["---:"] * len(FULL_VOCABULARY_COLUMNS)) + "|"]
    for label, block in rows:
        cells = [_cell(label)] + [_number(block.get(key), decimals) for key, _, decimals in FULL_VOCABULARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def temperature_table(labels: list[str], runs: list[dict]) -> list[str]:
    rows = [(label, run["temperature"]) for label, run in zip(labels, runs) if run.get("temperature")]
    if not rows:
        return []
    lines = ["| Run | Form | Value | Objective | Fitted on | ECE before → after | NLL before → after | Positions |",
             "|:---|:---|---:|:---|:---|:---|:---|---:|"]
    for label, t in rows:
        fitted = t.get("fitted_on") or {}
        where = fitted.get("path") if isinstance(fitted, dict) else fitted
        lines.append("| " + " | ".join([
            _cell(label), _cell(t.get("form")), _number(t.get("value"), 4), _cell(t.get("objective", "?")),
            md_code(where, in_table=True) if where else "?",
            f"{_number(t.get('ece_before'), 4)} → {_number(t.get('ece_after'), 4)}",
            f"{_number(t.get('nll_before'), 4)} → {_number(t.get('nll_after'), 4)}",
            f"{int(t['n_positions']):,}" if t.get("n_positions") is not None else "?",
        ]) + " |")
    return lines


def figure_groups(n_runs: int, per_figure: int = PANELS_PER_FIGURE) -> list[range]:
    """Runs per figure: at most `per_figure` panels each, balanced (7 runs -> 4 + 3, not 6 + 1)."""
    n_figures = max(1, math.ceil(n_runs / per_figure))
    base, extra = divmod(n_runs, n_figures)
    groups, lo = [], 0
    for i in range(n_figures):
        size = base + (1 if i < extra else 0)
        groups.append(range(lo, lo + size))
        lo += size
    return groups


def _figures(labels: list[str], runs: list[dict], out: Path) -> list[str]:
    """Write the reliability figure(s); return their file names."""
    from first_kd.plots import save_reliability_comparison

    names = []
    for i, group in enumerate(figure_groups(len(runs))):
        name = "reliability.png" if i == 0 else f"reliability-{i + 1}.png"
        save_reliability_comparison([(labels[j], runs[j]["bins"], runs[j]) for j in group], out / name)
        names.append(name)
    return names


_DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _data_text(run: dict) -> str:
    data = run.get("data")
    if not data:
        return ""
    # A file has one split; a hub dataset or a saved DatasetDict is read at the split that was asked for.
    split = run.get("split") if not str(data).endswith(_DATA_FILE_SUFFIXES) else None
    return f" on {md_code(data)}" + (f" (split {md_text(split)})" if split else "")


def render_markdown(title: str, labels: list[str], runs: list[dict], files: list[Path], figures: list[str],
                    out: Path) -> str:
    levels = {run.get("level") for run in runs}
    level_text = {"answer": "multiple-choice answers (confidence renormalised over the option letters)",
                  "token": "target tokens (top-1 probability vs the next token)",
                  "generation": "answers the model generated (confidence = its probability of the answer tokens "
                                "it wrote; no answer = wrong with confidence 0; NLL not defined)"}
    lines = [f"# {md_text(title)}", "", *metrics_table(labels, runs), ""]
    notes = ["ECE, MCE, Brier and NLL: lower is better; **bold** marks the best of a column."]
    notes.append("Scored on " + "; ".join(level_text.get(lv, md_text(lv)) for lv in sorted(levels, key=str)) + ".")
    if len(levels) > 1:
        notes.append("Runs score different things (answers vs tokens): compare rows of the same level only.")
    bins = {run.get("n_bins") for run in runs}
    notes.append(f"ECE / MCE use {', '.join(md_text(b) for b in sorted(bins, key=str))} equal-width confidence bins.")
    if any(run.get("nll_scope") not in (None, "all") for run in runs):
        notes.append("† NLL of a cached teacher (top-k store) averages over the examples whose gold answer or "
                     "token gets a probability > 0 from the top-k distribution; the others have no finite "
                     "log-likelihood under it.")
    lines += [" ".join(notes), ""]
    full = full_vocabulary_table(labels, runs)
    if full:
        lines += ["## Full-vocabulary confidence", "",
                  "The same multiple-choice answers scored on the model's own next-token probabilities, not "
                  "renormalised over the option letters: what a user who reads or samples the distilled model "
                  "gets. Confidence = the full-vocabulary probability of the chosen letter; Brier counts "
                  "'anything else' as one more class; mass on options = the probability of any option letter. "
                  "(Token-level runs are scored over the full vocabulary already.)", "", *full, ""]
    lines += ["## Reliability diagrams", ""]
    for i, name in enumerate(figures):  # one paragraph per image, so they stack instead of sharing a line
        part = f" ({i + 1} of {len(figures)})" if len(figures) > 1 else ""
        lines += [f"![Reliability diagrams{part}]({name})", ""]
    temps = temperature_table(labels, runs)
    if temps:
        lines += ["## Teacher temperature", "",
                  "Fitted by `first-kd calibrate` on held-out data; before = raw top-k, after = with the temperature. "
                  "These ECE / NLL are those of the fit: the top-1 of the teacher's top-k tokens at each target "
                  "position, not renormalised over answer options as in the table above.",
                  "", *temps, ""]
    lines += ["## Runs", ""]
    for label, run, file in zip(labels, runs, files):
        rel = Path(os.path.relpath(file.parent, out)).as_posix()
        what = f"model {md_code(run.get('model'))}" if run.get("source") != "store" else \
            f"store {md_code(run.get('store'))} (teacher {md_code(run.get('model'))})"
        diagram = f"reliability-{run['mode']}.png" if run.get("mode") else "reliability.png"
        links = ", ".join(f"[{name}]({md_link_target(f'{rel}/{target}')})" for name, target in
                          (("metrics", "metrics.json"), ("diagram", diagram), ("predictions", "predictions.jsonl")))
        lines.append(f"- **{_cell(label)}**: {what}{_data_text(run)}; {links}")
    return "\n".join(lines) + "\n"


def made_from(files: list[Path], labels: Optional[list[str]], title: str) -> dict:
    """What a report is a view of: its runs' metrics.json (path and content digest), labels and title."""
    return {"runs": [str(Path(f).resolve()) for f in files], "metrics_sha256": [file_sha256(f) for f in files],
            "labels": list(labels) if labels else None, "title": title}


def _publish(scratch: Path, out: Path, names: list[str]) -> None:
    """Move the finished files from `scratch` into `out`, report.json last (its presence with these
    digests is what says the report is complete)."""
    for name in sorted(names, key=lambda n: n == "report.json"):
        os.replace(scratch / name, out / name)
    fsync_dir(out)


def build_report(run_paths: list, out, labels: Optional[list[str]] = None,
                 title: str = "first-kd evaluation report") -> dict:
    """Write report.md, report.json and the reliability figure(s) into `out`; return the report.json dict.

    The files are made in a scratch directory inside `out` and moved into place when all are written, so a
    failure leaves the previous report's files as they were."""
    out = Path(out)
    loaded = [load_run(p) for p in run_paths]
    files = [f for f, _ in loaded]
    runs = [r for _, r in loaded]
    if labels and len(labels) != len(runs):
        raise FirstKDError(f"{len(labels)} label(s) for {len(runs)} run(s): give one label per run")
    names = list(labels) if labels else [str(r.get("label") or default_name(f)) for r, f in zip(runs, files)]
    names, runs, files = expand_modes(unique_labels(names), runs, files)
    names = unique_labels(names)
    origin = made_from([f for f, _ in loaded], labels, title)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        figures = _figures(names, runs, scratch)
        with name_errors(scratch / "report.md"):
            write_text_atomic(scratch / "report.md", render_markdown(title, names, runs, files, figures, out))
        report = {
            "title": title,
            "models": {name: {k: v for k, v in run.items() if k not in ("bins", "settings")} | {"metrics_file": str(f)}
                       for name, run, f in zip(names, runs, files)},
            "temperature": {name: run["temperature"] for name, run in zip(names, runs) if run.get("temperature")},
            "figures": figures,
            "made_from": origin,
            "files_sha256": {name: file_sha256(scratch / name) for name in ["report.md", *figures]},
        }
        with name_errors(scratch / "report.json"):  # strict JSON: a NaN a run's metrics.json holds is null
            write_json_atomic(scratch / "report.json", clean_json(report))
        _publish(scratch, out, ["report.md", *figures, "report.json"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def finished_report(out: Path, origin: dict) -> Optional[dict]:
    """The report.json in `out` when it was made from `origin` and its files are as it wrote them (the
    re-run is then a no-op), else None: no report, other runs, changed evaluations, or files edited since
    (the demo appends to report.md)."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("made_from") != origin:
        return None
    written = report.get("files_sha256")
    if not isinstance(written, dict) or not written:
        return None
    for name, digest in written.items():
        path = out / str(name)
        if Path(name).name != name or not path.is_file() or file_sha256(path) != digest:
            return None
    return report


def default_name(metrics_file: Path) -> str:
    return metrics_file.parent.name


def run_report(cfg: ReportConfig) -> int:
    out = Path(cfg.out)
    writable_parent(out)
    with exclusive_lock(out.resolve(), "report"):  # resolved: an --out of "." has a name and a parent
        origin = made_from([load_run(p)[0] for p in cfg.runs], cfg.labels or None, cfg.title)
        if not cfg.overwrite and finished_report(out, origin) is not None:
            return say_done("report", out, "a report of these evaluations")
        for stale in out.glob(".report-*") if out.is_dir() else []:  # scratch of a killed run (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        report = build_report(cfg.runs, cfg.out, cfg.labels or None, cfg.title)
    print(f"first-kd report: {len(report['models'])} run(s) -> {out / 'report.md'}, {out / 'report.json'}, "
          f"{', '.join(str(out / f) for f in report['figures'])}")
    return 0
