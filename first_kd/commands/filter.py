"""`first-kd filter`: keep the teacher-written rationales worth training on.

Input is `first-kd generate`'s jsonl (one line per sample: id, sample, prompt, rationale, answer,
gold, perturbed, ...; with --program also the stages, whose final output the answer was read from: the
filters compare answers of any kind, option letters and pairwise verdicts A / B / tie included, perturbed
samples' answers already mapped back to the original order by generate); output is prompt/response
jsonl that `cache` and `distill` read as it is, and the report beside it (OUT.filter.json: counts, drop
reasons, the settings and the output's sha256).

The filters themselves (finetune-cot for labelled data, self-consistency for unlabelled data, the
duplicate / unfinished / diversity rules and the drop reasons) are first_kd.selection; this command reads
and checks the input, runs one, and writes its output: the same command on a finished output is a no-op,
other settings are refused, and a failure leaves a finished output and its report as they were.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from first_kd.config import option
from first_kd.data import unescape
from first_kd.errors import FirstKDError
from first_kd.files import file_sha256, json_text, stage_text
from first_kd.outputs import crash_point, fsync_dir, say_done, settings_diff, writable_parent
from first_kd.selection import DEFAULT_ANSWER_TEMPLATE, finetune_cot, self_consistency, strip_cue, to_training_records

REQUIRED_FIELDS = ("id", "sample", "prompt", "rationale", "answer", "gold", "perturbed")


# ----------------------------------------------------------------------------------------------
# The command


@dataclass
class FilterConfig:
    """`first-kd filter GEN.jsonl --method ... --out TRAIN.jsonl`"""

    input: str = option(help="jsonl written by `first-kd generate`", positional=True)
    out: Optional[str] = option(None, help="prompt/response jsonl to write (what cache and distill read); the "
                                           "report goes beside it as OUT.filter.json")
    method: Optional[Literal["finetune-cot", "self-consistency"]] = option(
        None, help="finetune-cot: keep rationales whose answer equals the gold answer (labelled data); "
                   "self-consistency: keep questions whose majority answer reaches --threshold (unlabelled)")
    max_per_question: int = option(
        0, help="most rationales kept per question, the most diverse (word-set Jaccard) first; 0 = every "
                "distinct one")
    threshold: float = option(0.6, help="self-consistency: least share of a question's samples that must give "
                                        "the majority answer (kept when agreement >= threshold)")
    perturbation: bool = option(False, help="self-consistency: also require every perturbed sample (generate "
                                            "--perturb shuffle-options, or swap-answers: its verdict mapped back "
                                            "to the original order) to give the majority answer")
    final_answer_only: bool = option(
        False, help="one record per question whose response is only the answer (--answer-template), without "
                    "the rationale and without the --cue at the end of the prompt")
    answer_template: str = option(DEFAULT_ANSWER_TEMPLATE,
                                  help="final-answer-only response; must contain {answer}; a typed \\n is a newline")
    cue: str = option("Let's think step by step.",
                      help="final-answer-only: reasoning cue generate appended, taken off the prompts; '' keeps "
                           "prompts as generated (a --program's records keep theirs: their prompt is already "
                           "the program's student prompt)")
    overwrite: bool = option(False, help="replace an existing --out")

    def validate(self) -> None:
        if not self.out:
            raise FirstKDError("missing --out (the prompt/response jsonl to write, e.g. train.jsonl)")
        if not self.method:
            raise FirstKDError("missing --method: finetune-cot (data with gold answers) or self-consistency "
                               "(unlabelled data)")
        if Path(self.out).suffix != ".jsonl":
            raise FirstKDError(f"--out {self.out} must end in .jsonl (cache and distill read it as JSON lines)")
        if Path(self.out).resolve() == Path(self.input).resolve():
            raise FirstKDError("--out is the input file: choose another --out")
        if self.max_per_question < 0:
            raise FirstKDError(f"--max-per-question must be >= 0 (0 = no cap); got {self.max_per_question}")
        if not math.isfinite(self.threshold) or not 0.0 <= self.threshold <= 1.0:
            raise FirstKDError(f"--threshold must be a number between 0 and 1 (a share of samples); got "
                               f"{self.threshold}")
        if self.method != "self-consistency" and self.perturbation:
            raise FirstKDError("--perturbation applies to --method self-consistency only; drop it or change --method")
        try:
            names = {n for _, n, _, _ in string.Formatter().parse(self.answer_template) if n is not None}
        except ValueError as e:
            raise FirstKDError(f"--answer-template is not a valid format string ({e}); write literal braces "
                               f"as {{{{ }}}}") from None
        if names != {"answer"}:
            raise FirstKDError(f"--answer-template must contain {{answer}} and no other field; got "
                               f"{self.answer_template!r}")


def read_generated(path: str) -> list[dict]:
    """The records of a finished `first-kd generate` jsonl, checked line by line (FirstKDError)."""
    p = Path(path)
    if p.name.endswith(".partial") or (not p.exists() and Path(str(p) + ".partial").exists()):
        finished = p.name[: -len(".partial")] if p.name.endswith(".partial") else p.name
        raise FirstKDError(f"{path} is an unfinished `first-kd generate` run: re-run the same generate "
                           f"command to finish it, then filter {finished}")
    if p.is_dir():
        inside = sorted(q.name for q in p.glob("*.jsonl"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise FirstKDError(f"input {path} is a directory{hint}; pass the jsonl file written by `first-kd generate`, "
                           f"e.g. {p / (inside[0] if inside else 'gen.jsonl')}")
    if not p.is_file():
        raise FirstKDError(f"input {path} not found; pass the jsonl written by `first-kd generate`")
    records, seen = [], {}
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise FirstKDError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove the line, or "
                                   f"re-run generate") from None
            if not isinstance(r, dict):
                raise FirstKDError(f"{path} line {n} is not a JSON object; filter reads `first-kd generate` output")
            missing = [k for k in REQUIRED_FIELDS if k not in r]
            if missing:
                hint = (" (it looks like filter output already)" if "response" in r else "")
                raise FirstKDError(f"{path} line {n} lacks field(s) {', '.join(missing)}{hint}; filter reads the "
                                   f"jsonl written by `first-kd generate`")
            bad = _bad_types(r)
            if bad:
                raise FirstKDError(f"{path} line {n}: {bad}; filter reads the jsonl written by `first-kd generate`")
            r["id"] = str(r["id"])
            key = (r["id"], r["sample"])
            if key in seen:
                raise FirstKDError(f"{path} line {n}: question {r['id']} sample {r['sample']} repeats line "
                                   f"{seen[key]}; filter one generate output at a time")
            seen[key] = n
            records.append(r)
    if not records:
        raise FirstKDError(f"input {path} holds no records; run `first-kd generate` to write it")
    return records


def _bad_types(r: dict) -> Optional[str]:
    if not isinstance(r["id"], (str, int)) or isinstance(r["id"], bool):
        return f"'id' must be a string, got {r['id']!r}"
    if not isinstance(r["sample"], int) or isinstance(r["sample"], bool):
        return f"'sample' must be an integer, got {r['sample']!r}"
    for field in ("prompt", "rationale"):
        if not isinstance(r[field], str):
            return f"'{field}' must be a string, got {type(r[field]).__name__}"
    for field in ("answer", "gold"):
        if r[field] is not None and not isinstance(r[field], str):
            return f"'{field}' must be a string or null, got {r[field]!r}"
    if not isinstance(r["perturbed"], bool):
        return f"'perturbed' must be true or false, got {r['perturbed']!r}"
    return None


def _nothing_kept(report: dict, cfg: FilterConfig) -> FirstKDError:
    reasons = ", ".join(f"{n} {reason}" for reason, n in report["dropped_questions"].items())
    drops = report["dropped_questions"]
    if cfg.method == "finetune-cot":
        if drops.get("no gold answer") == report["questions_in"]:
            fix = "the data has no gold answers: use --method self-consistency"
        else:
            fix = "generate more --samples per question (with --temperature > 0), raise --max-new-tokens, or check " \
                  "that the generate --extractor finds the answers"
    else:
        fix = "lower --threshold, generate more --samples, drop --perturbation, or check that the generate " \
              "--extractor finds the answers"
    return FirstKDError(f"no records kept from {report['questions_in']} question(s) ({reasons}); {fix}")


def summary_text(report: dict, cfg: FilterConfig, n_written: int) -> str:
    lines = [f"first-kd filter: {cfg.method}: kept {report['records_kept']}/{report['records_in']} samples of "
             f"{report['questions_kept']}/{report['questions_in']} questions -> {cfg.out} ({n_written} records)"]
    for title, key in (("dropped samples", "dropped_records"), ("dropped questions", "dropped_questions")):
        if report[key]:
            lines.append(f"  {title}: " + ", ".join(f"{reason} {n}" for reason, n in report[key].items()))
    pseudo = report.get("pseudo_labels")
    if pseudo:
        def pct(x):
            return "n/a" if x is None else f"{100 * x:.1f}%"

        lines.append(f"  pseudo-label accuracy vs gold: {pct(pseudo['accuracy_kept'])} over {pseudo['n_kept']} kept "
                     f"questions, {pct(pseudo['accuracy_all'])} over all {pseudo['n_all']} answered (no threshold)")
    return "\n".join(lines)


def report_path(out: Path) -> Path:
    """Where filter's report (counts, drop reasons, the settings and the output's sha256) goes: OUT.filter.json."""
    return Path(out).with_suffix(".filter.json")


def read_filter_report(path: Path) -> Optional[dict]:
    """A report as `first-kd filter` writes it, or None when `path` is missing or is not one."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = report.get("settings") if isinstance(report, dict) else None
    return report if isinstance(settings, dict) and "method" in settings else None


def _already_filtered(cfg: FilterConfig, settings: dict) -> bool:
    """Whether --out already holds this very filtering (the run is a no-op). Another filtering, or a file
    filter did not write, is refused without --overwrite. Same settings with an output that is not the one
    the report records (a run cut between its two renames) is redone."""
    out = Path(cfg.out)
    if not out.exists():
        return False
    if out.is_dir():
        raise FirstKDError(f"--out {out} is a directory: give the .jsonl file to write, e.g. {out / 'train.jsonl'}")
    report = read_filter_report(report_path(out))
    if cfg.overwrite:
        return False
    if report is None:
        raise FirstKDError(f"{out} exists and is not a `first-kd filter` output (no {report_path(out).name} beside "
                           f"it): choose another --out, or pass --overwrite to replace it")
    diff = settings_diff(report["settings"], settings)
    if diff:
        raise FirstKDError(f"{out} holds filter output made with other settings ({diff}): pass --overwrite to "
                           f"replace it, or choose another --out")
    return report.get("output_sha256") in (None, file_sha256(out))


def write_outputs(out: Path, rows_text: str, report: dict) -> None:
    """Both files are written in full before either replaces anything, so a failure (full disk, read-only
    folder, kill) leaves a finished output and its report as they were; the report, holding the output's
    sha256, is renamed first, so a kill between the renames is seen as unfinished and redone by a re-run."""
    report_text = json_text({**report, "output_sha256": hashlib.sha256(rows_text.encode("utf-8")).hexdigest()})
    staged_rows = stage_text(out, rows_text)
    try:
        staged_report = stage_text(report_path(out), report_text)
    except BaseException:
        staged_rows.unlink(missing_ok=True)
        raise
    os.replace(staged_report, report_path(out))
    crash_point("filter:between-renames")
    os.replace(staged_rows, out)
    fsync_dir(out.parent)


def run_filter(cfg: FilterConfig) -> int:
    out = Path(cfg.out)
    writable_parent(out)
    records = read_generated(cfg.input)
    settings = {"input": str(cfg.input), "input_sha256": file_sha256(cfg.input), "method": cfg.method,
                "max_per_question": cfg.max_per_question, "threshold": cfg.threshold,
                "perturbation": cfg.perturbation, "final_answer_only": cfg.final_answer_only,
                "answer_template": cfg.answer_template, "cue": cfg.cue}
    if _already_filtered(cfg, settings):
        return say_done("filter", out, "the filtered records")
    # The rationale is not trained on in final-answer-only mode, so a truncated one costs nothing.
    keep_unfinished = cfg.final_answer_only
    if cfg.method == "finetune-cot":
        kept, report = finetune_cot(records, cfg.max_per_question, drop_unfinished=not keep_unfinished)
    else:
        kept, report = self_consistency(records, cfg.threshold, cfg.max_per_question, cfg.perturbation,
                                        drop_unfinished=not keep_unfinished)
    if not kept:
        raise _nothing_kept(report, cfg)
    template = unescape(cfg.answer_template)
    # A program's prompt is its student prompt (no System-2 cue to take off); plain generate's ends with --cue.
    cue = cfg.cue if cfg.final_answer_only and not any("program" in r for r in records) else ""
    rows = to_training_records(kept, cfg.final_answer_only, template, cue)
    first_prompts = {str(r["id"]): r["prompt"] for r in reversed(kept)}  # what to_training_records used
    uncued = sum(strip_cue(p, cue) is None for p in first_prompts.values()) if cue else 0
    rows_text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    write_outputs(out, rows_text, {**report, "records_written": len(rows), "settings": settings})
    print(summary_text(report, cfg, len(rows)))
    if uncued:
        print(f"first-kd filter: note: {uncued} prompt(s) did not end with --cue {cfg.cue!r} and were kept as they "
              f"were; set --cue to the cue generate used ('' to keep every prompt)")
    return 0
