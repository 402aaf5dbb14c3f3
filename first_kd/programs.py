"""Prompt programs (`first-kd generate --program NAME_OR_FILE`): System-2 prompting written as a short list of
stages the teacher runs one after the other on each question.

A program is a YAML file (the built-in ones are configs/programs/*.yaml: cot, rar-1step, rar-2step, s2a, bsm;
copy one and edit it). Its keys:

  name         the program's name (recorded with the output)
  stages       the list of stages, run in order; each is a mapping:
                 name            an identifier; later templates name its output {NAME} and its prompt {NAME_prompt}
                 template        the stage's prompt, a Python format string over the record's fields, the
                                 built-in fields and earlier stages' outputs (write literal braces as {{ }})
                 temperature, top_p, max_new_tokens
                                 the stage's sampling settings (default: the command's options)
                 stop            strings that end the stage's text: it is cut before the first one (generation
                                 itself still runs to eos or the token budget; the tokens are counted)
                 fan_out         {over: STAGE, split: lines | REGEX, max: N}: run the stage once per item of an
                                 earlier stage's text (non-empty lines, or every match of REGEX: its group
                                 `item`, else group 1, else the match), at most N items; a text with no item is
                                 one item (the whole text). The template may name {item} and {n} (1-based).
                                 Later templates see the fan-out's outputs joined by `join` (default a blank line).
  final        the stage whose output is the final output the extractor reads (default: the last stage)
  extractor    optional: the answer extractor (a first_kd.data.rationale preset or a regex) for the final
               output; without it, generate's --extractor
  answers      text (default) or verdict: pairwise judgements, read as A, B or tie ("C" and "tie" are a tie;
               anything else is no answer); generate's --perturb swap-answers needs it
  prompt       the prompt a student is trained on (the System-1 input; default: the first stage's template)
  response     the record's `rationale`, what Fine-tune-CoT trains on (default: {FINAL})

Built-in fields of every template: {question} (the question text), {options} ("A. text" lines of a
multiple-choice record, in the order shown; '' otherwise), and every field of the record ({answer_a} and
{answer_b} of a pairwise record are swapped in a swapped sample). A field a template names that is neither a
built-in, an earlier stage nor a field of the data is refused before anything runs.

`run_rows` runs a program over a unit's rows stage by stage, each stage one call of the caller's generate
function over all the rows (fan-out items included), so the outputs depend on the rows and that function only.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from first_kd.config import builtin_names, builtin_or_file, read_yaml_file
from first_kd.errors import FirstKDError

PROGRAMS_DIR = Path(__file__).resolve().parents[1] / "configs" / "programs"
BUILTIN_FIELDS = ("question", "options")
ITEM_FIELDS = ("item", "n")
STAGE_KEYS = ("name", "template", "temperature", "top_p", "max_new_tokens", "stop", "fan_out", "join")
PROGRAM_KEYS = ("name", "description", "stages", "final", "extractor", "answers", "prompt", "response")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass
class FanOut:
    over: str
    split: str = "lines"
    max: int = 8


@dataclass
class Stage:
    name: str
    template: str
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_new_tokens: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    fan_out: Optional[FanOut] = None
    join: str = "\n\n"


@dataclass
class Program:
    name: str
    path: str
    sha256: str
    stages: list[Stage]
    final: str
    prompt: str
    response: str
    extractor: Optional[str] = None
    answers: str = "text"

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


# ----------------------------------------------------------------------------------------------
# Reading a program file


def builtin_programs() -> list[str]:
    """Names of the programs shipped in configs/programs/."""
    return builtin_names(PROGRAMS_DIR)


def program_path(name_or_file: str) -> Path:
    """The file of `name_or_file`: a path to a YAML file, or the name of a built-in program."""
    return builtin_or_file(name_or_file, PROGRAMS_DIR, "--program", "program")


def template_fields(template: str, where: str) -> list[str]:
    """The field names `template` uses, in order; a FirstKDError (naming `where`) for a malformed one."""
    try:
        names = [n for _, n, _, _ in string.Formatter().parse(template) if n is not None]
    except ValueError as e:
        raise FirstKDError(f"{where} is not a valid template ({e}); write literal braces as {{{{ }}}}") from None
    for n in names:
        if not _IDENTIFIER.match(n):
            raise FirstKDError(f"{where} names {{{n}}}: a template names plain fields only ({{question}}, "
                               f"{{STAGE}}, ...), with no attribute, index or empty name")
    return names


def _fail(path: str, where: str, what: str) -> FirstKDError:
    return FirstKDError(f"program {path}: {where}: {what}")


def _number(path, where, value, kind, low, high=None, low_open=False):
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or
                                                                                   isinstance(value, int))
    if not ok_type or value != value or (value <= low if low_open else value < low) or \
            (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise _fail(path, where, f"must be {'an integer' if kind is int else 'a number'} {bound}, got {value!r}")
    return value


def _parse_fan_out(path: str, where: str, raw, earlier: list[str]) -> FanOut:
    if not isinstance(raw, dict) or "over" not in raw or set(raw) - {"over", "split", "max"}:
        raise _fail(path, where, "must be a mapping {over: STAGE, split: lines | REGEX, max: N}")
    if raw["over"] not in earlier:
        raise _fail(path, f"{where}.over", f"{raw['over']!r} is not an earlier stage ({', '.join(earlier) or 'none'})")
    split = raw.get("split", "lines")
    if not isinstance(split, str) or not split:
        raise _fail(path, f"{where}.split", "must be 'lines' or a regular expression")
    if split != "lines":
        try:
            re.compile(split)
        except re.error as e:
            raise _fail(path, f"{where}.split", f"is not a valid regular expression ({e})") from None
    return FanOut(raw["over"], split, _number(path, f"{where}.max", raw.get("max", 8), int, 1))


def _parse_stage(path: str, i: int, raw, earlier: list[str]) -> Stage:
    where = f"stages[{i}]"
    if not isinstance(raw, dict):
        raise _fail(path, where, "must be a mapping with name and template")
    unknown = sorted(set(raw) - set(STAGE_KEYS))
    if unknown:
        raise _fail(path, f"{where}.{unknown[0]}", f"unknown key (keys: {', '.join(STAGE_KEYS)})")
    name, template = raw.get("name"), raw.get("template")
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or name.endswith("_prompt"):
        raise _fail(path, f"{where}.name", f"must be an identifier not ending in _prompt, got {name!r}")
    if name in earlier or name in BUILTIN_FIELDS + ITEM_FIELDS:
        raise _fail(path, f"{where}.name", f"{name!r} is already " + ("a stage" if name in earlier else "a built-in field"))
    if not isinstance(template, str) or not template:
        raise _fail(path, f"{where}.template", "must be a non-empty string")
    stop = raw.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _fail(path, f"{where}.stop", "must be a string or a list of non-empty strings")
    fan_out = None if raw.get("fan_out") is None else _parse_fan_out(path, f"{where}.fan_out", raw["fan_out"], earlier)
    stage = Stage(name, template, stop=stop, fan_out=fan_out, join=raw.get("join", "\n\n"))
    if not isinstance(stage.join, str):
        raise _fail(path, f"{where}.join", "must be a string")
    if raw.get("temperature") is not None:
        stage.temperature = float(_number(path, f"{where}.temperature", raw["temperature"], float, 0))
        if 0 < stage.temperature < 0.01:
            raise _fail(path, f"{where}.temperature", "is too small to sample with: use 0 (greedy) or >= 0.01")
    if raw.get("top_p") is not None:
        stage.top_p = float(_number(path, f"{where}.top_p", raw["top_p"], float, 0, 1, low_open=True))
    if raw.get("max_new_tokens") is not None:
        stage.max_new_tokens = _number(path, f"{where}.max_new_tokens", raw["max_new_tokens"], int, 1)
    for n in template_fields(template, f"program {path}: {where}.template"):
        if n in ITEM_FIELDS and fan_out is None:
            raise _fail(path, f"{where}.template", f"names {{{n}}}, which only a fan_out stage has")
        if n == name or n == f"{name}_prompt":
            raise _fail(path, f"{where}.template", f"names its own stage {{{n}}}")
    return stage


def _check_stage_refs(path: str, where: str, template: str, stages: list[str], after: Optional[str]) -> None:
    """Every field of `template` that names a stage names one that has run by then (before `after`)."""
    order = stages if after is None else stages[: stages.index(after)]
    for n in template_fields(template, f"program {path}: {where}"):
        base = n[: -len("_prompt")] if n.endswith("_prompt") else n
        if base in stages and base not in order:
            raise _fail(path, where, f"names {{{n}}}, a stage that has not run yet")


def load_program(name_or_file: str) -> Program:
    """The program `name_or_file` names (a built-in name or a YAML file), parsed and checked: any problem is a
    one-line FirstKDError naming the file and the field."""
    path = program_path(name_or_file)
    raw, text = read_yaml_file(path, "program")
    if not isinstance(raw, dict):
        raise _fail(str(path), "file", "must hold a mapping (name, stages, ...)")
    p = str(path)
    unknown = sorted(set(raw) - set(PROGRAM_KEYS))
    if unknown:
        raise _fail(p, unknown[0], f"unknown key (keys: {', '.join(PROGRAM_KEYS)})")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise _fail(p, "stages", "must be a non-empty list of stages")
    stages: list[Stage] = []
    for i, item in enumerate(raw["stages"]):
        stages.append(_parse_stage(p, i, item, [s.name for s in stages]))
    names = [s.name for s in stages]
    for i, s in enumerate(stages):
        _check_stage_refs(p, f"stages[{i}].template", s.template, names, s.name)
    final = raw.get("final", names[-1])
    if final not in names:
        raise _fail(p, "final", f"{final!r} is not a stage ({', '.join(names)})")
    answers = raw.get("answers", "text")
    if answers not in ("text", "verdict"):
        raise _fail(p, "answers", f"must be text or verdict, got {answers!r}")
    prompt, response = raw.get("prompt", stages[0].template), raw.get("response", "{" + final + "}")
    for key, value in (("prompt", prompt), ("response", response), ("name", raw.get("name", path.stem))):
        if not isinstance(value, str) or not value:
            raise _fail(p, key, "must be a non-empty string")
    for key, value in (("prompt", prompt), ("response", response)):
        if set(template_fields(value, f"program {p}: {key}")) & set(ITEM_FIELDS):
            raise _fail(p, key, "names {item} or {n}, which only a fan_out stage has")
    extractor = raw.get("extractor")
    if extractor is not None:
        from first_kd.data.rationale import compile_extractor

        if not isinstance(extractor, str):
            raise _fail(p, "extractor", "must be a preset name or a regular expression")
        try:
            compile_extractor(extractor)
        except FirstKDError as e:
            raise _fail(p, "extractor", str(e).replace("--extractor ", "")) from None
    return Program(str(raw.get("name", path.stem)), p, hashlib.sha256(text.encode()).hexdigest(), stages, final,
                   prompt, response, extractor, answers)


def check_fields(program: Program, columns: Sequence[str]) -> None:
    """Every field the program's templates name exists: a built-in, an earlier stage (or its prompt), a fan-out
    item, or a field of the data (`columns`). A FirstKDError naming the file, the template and the field."""
    stages = [s.name for s in program.stages]
    known = set(BUILTIN_FIELDS) | set(stages) | {f"{s}_prompt" for s in stages} | set(columns)
    clash = sorted(set(columns) & (set(stages) | {f"{s}_prompt" for s in stages}))
    if clash:
        raise _fail(program.path, "stages", f"stage output {{{clash[0]}}} has the name of a field of the data; "
                                           f"rename the stage")
    named = [(f"stages[{i}].template", s.template) for i, s in enumerate(program.stages)]
    for where, template in named + [("prompt", program.prompt), ("response", program.response)]:
        for n in template_fields(template, f"program {program.path}: {where}"):
            if n not in known and n not in ITEM_FIELDS:
                raise _fail(program.path, where, f"names {{{n}}}, which is neither a built-in field (question, "
                                                f"options), a stage, nor a field of the data "
                                                f"({', '.join(sorted(columns))})")


# ----------------------------------------------------------------------------------------------
# Rendering, fan-out, stop strings, verdicts (pure)


def render(template: str, fields: dict) -> str:
    """`template` filled from `fields` (names are checked beforehand by `check_fields`)."""
    return template.format_map(fields)


def split_items(text: str, fan_out: FanOut) -> list[str]:
    """The items a fan-out stage runs over: non-empty stripped lines of `text` (split: lines) or every match
    of the regex (its group `item`, else group 1, else the whole match), at most fan_out.max of them; a text
    with no item is one item, the whole text stripped."""
    if fan_out.split == "lines":
        items = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        pattern = re.compile(fan_out.split)
        group = "item" if "item" in pattern.groupindex else (1 if pattern.groups else 0)
        items = [m.group(group).strip() for m in pattern.finditer(text) if m.group(group) and m.group(group).strip()]
    return items[: fan_out.max] or [text.strip()]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(`text` before the first occurrence of any of `stops`, right-stripped; whether it was cut)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    return (text, False) if cut is None else (text[:cut].rstrip(), True)


def normalize_verdict(answer: Optional[str]) -> Optional[str]:
    """A pairwise verdict as A, B or tie ("C" or "tie", any case, is a tie); anything else is None."""
    if answer is None:
        return None
    a = answer.strip().strip("[]()\"'.").strip()
    if a.upper() in ("A", "B"):
        return a.upper()
    return "tie" if a.upper() in ("C", "TIE") else None


def swap_verdict(verdict: Optional[str]) -> Optional[str]:
    """The verdict a judge gave on the swapped pair, in the original order: A <-> B, tie stays, None stays."""
    return {"A": "B", "B": "A", "tie": "tie"}.get(verdict) if verdict is not None else None


def stage_seed(seed: int, unit: int, stage: str) -> int:
    """The seed of one stage of one unit: a hash of (seed, unit, stage name), unrelated across stages."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{unit}:{stage}".encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------
# Running a program over rows


@dataclass
class StageCall:
    """One stage's batched call: the stage, and its prompts (one per row, or per fan-out item)."""

    index: int
    stage: Stage
    prompts: list[str]


@dataclass
class RowResult:
    """A row's program run: each stage's text (a list for fan-out stages) and prompt, the tokens generated by
    all its stages, whether every stage ended (eos or a stop string) within its budget, and the final text."""

    stages: dict
    prompts: dict
    n_tokens: int
    finished: bool
    final: str
    prompt: str
    response: str


def run_rows(program: Program, rows: list[dict], generate: Callable[[StageCall], list]) -> list[RowResult]:
    """Run `program` over `rows` (each the fields its templates read: the record's fields and the built-ins).
    Stage by stage, `generate(call)` gives (text, n_tokens, finished) per prompt of the call; texts are cut at
    the stage's stop strings (a cut text is finished)."""
    outputs: list[dict] = [{} for _ in rows]   # per row: stage -> text or [texts]
    prompts: list[dict] = [{} for _ in rows]
    tokens = [0] * len(rows)
    finished = [True] * len(rows)
    for index, stage in enumerate(program.stages):
        owners, call_prompts = [], []
        for r, fields in enumerate(rows):
            seen = {**fields, **_visible(program, outputs[r], prompts[r])}
            if stage.fan_out is None:
                owners.append(r)
                call_prompts.append(render(stage.template, seen))
                continue
            source = outputs[r][stage.fan_out.over]
            source = source if isinstance(source, str) else program.stage(stage.fan_out.over).join.join(source)
            for n, item in enumerate(split_items(source, stage.fan_out), 1):
                owners.append(r)
                call_prompts.append(render(stage.template, {**seen, "item": item, "n": n}))
        results = generate(StageCall(index, stage, call_prompts))
        for r in range(len(rows)):
            if stage.fan_out is not None:
                outputs[r][stage.name], prompts[r][stage.name] = [], []
        for r, prompt, (text, n_tokens, done) in zip(owners, call_prompts, results):
            text, stopped = cut_at_stop(text, stage.stop)
            tokens[r] += n_tokens
            finished[r] = finished[r] and (done or stopped)
            if stage.fan_out is None:
                outputs[r][stage.name], prompts[r][stage.name] = text, prompt
            else:
                outputs[r][stage.name].append(text)
                prompts[r][stage.name].append(prompt)
    results = []
    for r, fields in enumerate(rows):
        seen = {**fields, **_visible(program, outputs[r], prompts[r])}
        results.append(RowResult(outputs[r], prompts[r], tokens[r], finished[r], seen[program.final],
                                 render(program.prompt, seen), render(program.response, seen)))
    return results


def _visible(program: Program, outputs: dict, prompts: dict) -> dict:
    """What later templates see of the stages run so far: {NAME} and {NAME_prompt}, fan-outs joined."""
    seen = {}
    for name, text in outputs.items():
        join = program.stage(name).join
        seen[name] = text if isinstance(text, str) else join.join(text)
        seen[f"{name}_prompt"] = prompts[name] if isinstance(prompts[name], str) else join.join(prompts[name])
    return seen
