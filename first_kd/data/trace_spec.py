"""Trace specs (`--trace-spec NAME_OR_FILE`): the YAML file that says how a response is a trace of typed steps and
how Dualformer-style levels drop parts of it (the operations themselves are first_kd.data.traces).

The built-in specs are configs/traces/*.yaml: `astar` (A* search traces: create / close clauses, then plan
lines; the paper's levels L0-L4) and `steps` (natural-language rationales whose last line is the answer: the
--trace-levels 0,0.5,1 variants as levels). Copy one and edit it. Its keys:

  name            the spec's name (default: the file name); recorded with a run, with the file's sha256
  description     free text
  separator       what separates the steps of a response; default: --step-separator. When given, it must equal
                  --step-separator (evaluate --modes forces marker + --step-separator, so the two must agree)
  types           mapping step type -> regex, in match order: a step's type is the first whose regex matches
                  it (re.search; anchor with ^...$ to match whole steps). A step no type matches is an error
                  naming the record
  strip           mapping step type -> regex of the tokens `strip` removes from its steps (e.g. ' c\\d+')
  kept            step types outside the trace (the solution, e.g. plan lines): never dropped or stripped
  last_is_answer  true: the response's last piece is an answer line, always kept and never typed (default false)
  levels          the levels, in order (--trace-probs gives their probabilities in this order), each a mapping
                    name   an identifier, unique
                    p      its probability; the levels' p sum to 1 (within 1e-6)
                    ops    operations applied in order (none: the full trace):
                             drop: TYPE | [TYPES]                      every step of those trace types
                             strip: TYPE | [TYPES]                     their `strip` tokens
                             drop_fraction: {type: TYPE, fraction: F}  round(F * n) of the n steps of TYPE, at random
                             drop_trace                                every step of every trace type
  A level that leaves no trace step (each trace type dropped whole) is fast: its target opens with --fast-marker;
  every other level's with --slow-marker.

Any problem with a file is a one-line FirstKDError naming the file, the key and the fix.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

from first_kd.data.traces import Level, Op, TraceSpec, check_probs
from first_kd.config import builtin_names, builtin_or_file, read_yaml_file
from first_kd.errors import FirstKDError

SPECS_DIR = Path(__file__).resolve().parents[2] / "configs" / "traces"
SPEC_KEYS = ("name", "description", "separator", "types", "strip", "kept", "last_is_answer", "levels")
LEVEL_KEYS = ("name", "p", "ops")
OP_KINDS = ("drop", "strip", "drop_fraction", "drop_trace")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def builtin_specs() -> list[str]:
    """Names of the specs shipped in configs/traces/."""
    return builtin_names(SPECS_DIR)


def spec_path(name_or_file: str) -> Path:
    """The file of `name_or_file`: a path to a YAML file, or the name of a built-in spec."""
    return builtin_or_file(name_or_file, SPECS_DIR, "--trace-spec", "spec")


def _fail(path, where: str, what: str) -> FirstKDError:
    return FirstKDError(f"trace spec {path}: {where}: {what}")


def _names(path, where: str, value, allowed: list[str], what: str) -> tuple[str, ...]:
    """A type name or a list of them, each one of `allowed`."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _fail(path, where, f"must be a type name or a list of them ({', '.join(allowed)})")
    for n in names:
        if n not in allowed:
            raise _fail(path, where, f"{n!r} is not {what} ({', '.join(allowed) or 'none'}): name one of them")
    return tuple(names)


def _regex(path, where: str, value) -> str:
    if not isinstance(value, str):
        raise _fail(path, where, "must be a regular expression (a string; quote it in YAML)")
    try:
        re.compile(value)
    except re.error as e:
        raise _fail(path, where, f"is not a valid regular expression ({e}); fix it") from None
    return value


def _parse_op(path, where: str, raw, trace: list[str], strippable: list[str]) -> Op:
    if raw == "drop_trace":
        return Op("drop_trace")
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in OP_KINDS:
        raise _fail(path, where, "must be drop_trace or a one-key mapping drop: TYPES, strip: TYPES or "
                                 "drop_fraction: {type: TYPE, fraction: F}")
    kind, value = next(iter(raw.items()))
    if kind == "drop":
        return Op("drop", _names(path, f"{where}.drop", value, trace, "a trace type"))
    if kind == "strip":
        return Op("strip", _names(path, f"{where}.strip", value, strippable, "a type with strip tokens"))
    if kind == "drop_trace":
        raise _fail(path, where, "write drop_trace on its own, not as a mapping")
    if not isinstance(value, dict) or set(value) != {"type", "fraction"}:
        raise _fail(path, f"{where}.drop_fraction", "must be a mapping {type: TYPE, fraction: F}")
    if not isinstance(value["type"], str):
        raise _fail(path, f"{where}.drop_fraction.type", "must be one trace type")
    (kind_name,) = _names(path, f"{where}.drop_fraction.type", value["type"], trace, "a trace type")
    fraction = value["fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise _fail(path, f"{where}.drop_fraction.fraction", f"must be a number in [0, 1], got {fraction!r}")
    return Op("drop_fraction", (kind_name,), float(fraction))


def _parse_levels(path, raw, trace: list[str], strippable: list[str]) -> tuple[Level, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail(path, "levels", "must be a non-empty list of levels {name, p, ops}")
    levels: list[Level] = []
    for i, item in enumerate(raw):
        where = f"levels[{i}]"
        if not isinstance(item, dict):
            raise _fail(path, where, "must be a mapping {name, p, ops}")
        unknown = sorted(set(item) - set(LEVEL_KEYS))
        if unknown:
            raise _fail(path, f"{where}.{unknown[0]}", f"unknown key (keys: {', '.join(LEVEL_KEYS)})")
        name, p = item.get("name"), item.get("p")
        if not isinstance(name, str) or not _IDENTIFIER.match(name) or name in [lv.name for lv in levels]:
            raise _fail(path, f"{where}.name", f"must be a new identifier, got {name!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise _fail(path, f"{where}.p", f"must be a probability (a number >= 0), got {p!r}")
        ops = item.get("ops") or []
        if not isinstance(ops, list):
            raise _fail(path, f"{where}.ops", "must be a list of operations")
        levels.append(Level(name, float(p), tuple(_parse_op(path, f"{where}.ops[{j}]", op, trace, strippable)
                                                  for j, op in enumerate(ops))))
    try:
        check_probs([lv.p for lv in levels], [lv.name for lv in levels])
    except ValueError as e:
        raise _fail(path, "levels[].p", str(e)) from None
    return tuple(levels)


def _parse_types(path, raw) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, "types", "must be a mapping of step type -> regex, in match order (e.g. create: '^create ')")
    for name in raw:
        if not isinstance(name, str) or not _IDENTIFIER.match(name):
            raise _fail(path, "types", f"type name {name!r} is not an identifier")
    return tuple((name, _regex(path, f"types.{name}", pattern)) for name, pattern in raw.items())


def parse_spec(raw, path: str, text: str = "") -> TraceSpec:
    """A TraceSpec from a parsed YAML mapping (`path` names it in errors; `text` is hashed)."""
    if not isinstance(raw, dict):
        raise _fail(path, "file", "must hold a mapping (types, levels, ...)")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise _fail(path, unknown[0], f"unknown key (keys: {', '.join(SPEC_KEYS)})")
    types = _parse_types(path, raw.get("types"))
    names = [name for name, _ in types]
    kept = _names(path, "kept", raw["kept"], names, "a step type") if raw.get("kept") else ()
    trace = [n for n in names if n not in kept]
    if not trace:
        raise _fail(path, "kept", "leaves no trace type: keep only the solution's types")
    strip_raw = raw.get("strip") or {}
    if not isinstance(strip_raw, dict):
        raise _fail(path, "strip", "must be a mapping of step type -> regex of the tokens to strip")
    strip = tuple((_names(path, "strip", kind, trace, "a trace type")[0], _regex(path, f"strip.{kind}", pattern))
                  for kind, pattern in strip_raw.items())
    answer_last = raw.get("last_is_answer", False)
    if not isinstance(answer_last, bool):
        raise _fail(path, "last_is_answer", f"must be true or false, got {answer_last!r}")
    separator = raw.get("separator")
    if separator is not None and (not isinstance(separator, str) or not separator):
        raise _fail(path, "separator", "must be a non-empty string (quote it: \"\\n\")")
    name = raw.get("name", Path(path).stem)
    if not isinstance(name, str) or not name:
        raise _fail(path, "name", "must be a non-empty string")
    levels = _parse_levels(path, raw.get("levels"), trace, [kind for kind, _ in strip])
    return TraceSpec(name, types, levels, strip, kept, answer_last, separator, path,
                     hashlib.sha256(text.encode()).hexdigest())


def load_trace_spec(name_or_file: str) -> TraceSpec:
    """The spec `name_or_file` names (a built-in name or a YAML file), parsed and checked: any problem is a
    one-line FirstKDError naming the file and the key."""
    path = spec_path(name_or_file)
    raw, text = read_yaml_file(path, "trace spec")
    return parse_spec(raw, str(path), text)


def spec_record(spec: TraceSpec, probs: list[float]) -> dict:
    """What a run records of its spec: name, sha256 of the file, level names and the probabilities used."""
    return {"name": spec.name, "sha256": spec.sha256, "levels": spec.level_names, "probs": list(probs)}
