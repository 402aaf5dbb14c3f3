"""Typed run configs: dataclass fields are the options, their `help` metadata is the CLI help.

Every command's options come from one dataclass. Values are merged in this order, later winning:
dataclass defaults < `--config FILE.yaml` < `key=value` overrides < `--flag value`.

A YAML file may hold one mapping of options, or one section per command (`cache:`, `distill:` ...)
so a single recipe file can drive a whole pipeline; a command reads its own section when present.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from first_kd.errors import FirstKDError


def option(default: Any = dataclasses.MISSING, help: str = "", positional: bool = False, **kwargs):
    """A config field. `help` is shown by `--help`; `positional=True` makes it a bare CLI argument."""
    metadata = {"help": help, "positional": positional}
    if default is dataclasses.MISSING and "default_factory" not in kwargs:
        return dataclasses.field(metadata=metadata, **kwargs)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _unwrap_optional(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp) -> Any:
    """Convert a YAML / CLI value to the field's type, or raise a one-line FirstKDError."""
    base, optional = _unwrap_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise FirstKDError(f"option '{name}' needs a value")
    origin = get_origin(base)
    if origin is Literal:
        choices = get_args(base)
        if isinstance(value, str) and value not in choices:
            # YAML may have read "1" as an int where the choices are strings, and vice versa.
            pass
        if value not in choices and str(value) not in [str(c) for c in choices]:
            raise FirstKDError(f"option '{name}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return next(c for c in choices if str(c) == str(value))
    if origin in (list, typing.List):
        (item_tp,) = get_args(base) or (str,)
        if not isinstance(value, (list, tuple)):
            value = [value]
        # "a,b" and ["a", "b"] mean the same, so `--runs a,b` and `report a b` both work.
        value = [part for v in value for part in (str(v).split(",") if isinstance(v, str) else [v]) if part != ""]
        return [_coerce(name, v, item_tp) for v in value]
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict):
            raise FirstKDError(f"option '{name}' must be a mapping; got {value!r}")
        return dict(value)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        raise FirstKDError(f"option '{name}' must be {base.__name__}; got {value!r}") from None
    return value


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one `--flag` (or positional) per dataclass field, plus `--config` and `key=value` overrides."""
    types_ = _field_types(cls)
    positional_help = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(types_[f.name])
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING and f.default not in (None, "") and not f.metadata.get("positional"):
            help_text += f" (default: {f.default})"
        if f.metadata.get("positional"):
            positional_help.append(f"{f.name.upper()}: {help_text}")
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = "|".join(map(str, get_args(tp))) if get_origin(tp) is Literal else None
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, metavar=metavar)
    parser.add_argument("--config", dest="_config", default=None, metavar="FILE.yaml",
                        help="YAML file of options (flags and key=value given here override it)")
    # Bare words are either the command's positional argument(s) or key=value overrides; one
    # catch-all keeps argparse from handing `lr=1e-4` to a positional (from_args sorts them out).
    names = [f.name.upper() + ("..." if get_origin(_unwrap_optional(types_[f.name])[0]) in (list, typing.List) else "")
             for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    parser.add_argument("_words", nargs="*", metavar=" ".join(names + ["[key=value ...]"]), default=[],
                        help="; ".join(positional_help + ["key=value: option overrides, e.g. lr=1e-4 batch_size=8"]))


def read_yaml(path: str, section: Optional[str]) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FirstKDError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise FirstKDError(f"config file {path}{where} is not valid YAML: fix the syntax") from None
    if not isinstance(data, dict):
        raise FirstKDError(f"config file {path} must hold a mapping of options")
    if section and isinstance(data.get(section), dict):
        return data[section]
    return data


def build(cls, values: dict, source: str = "options"):
    """Make a validated config from a dict of raw values (unknown keys are an error)."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise FirstKDError(
            f"unknown option(s) {', '.join(unknown)} in {source}: valid options are {', '.join(types_)}"
        )
    kwargs = {k: _coerce(k, v, types_[k]) for k, v in values.items()}
    missing = [f for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in kwargs]
    if missing:
        names = ", ".join(f.name.upper() if f.metadata.get("positional") else "--" + f.name.replace("_", "-")
                          for f in missing)
        raise FirstKDError(f"missing required argument(s): {names}")
    cfg = cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _parse_override(raw: str):
    """`key=value` values read as YAML scalars or lists (1e-4, true, [a, b]); anything else, such as a
    template with a colon or braces, stays the string that was typed."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return value if isinstance(value, (str, int, float, bool, list)) or value is None else raw


def from_args(cls, args: argparse.Namespace, section: Optional[str] = None):
    """Merge defaults < YAML < key=value < flags from a parsed namespace into a validated config."""
    values: dict = {}
    names = {f.name for f in dataclasses.fields(cls)}
    config_path = getattr(args, "_config", None)
    if config_path:
        values.update(read_yaml(config_path, section))
    words = list(getattr(args, "_words", []) or [])
    overrides = [w for w in words if "=" in w]
    bare = [w for w in words if "=" not in w]
    for item in overrides:
        key, raw = item.split("=", 1)
        values[key.strip().replace("-", "_")] = _parse_override(raw)
    for name in names:
        if name in vars(args):
            values[name] = getattr(args, name)
    # Positional words rank with flags: they are typed on the command line for this run.
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("positional") or not bare:
            continue
        if get_origin(_unwrap_optional(types_[f.name])[0]) in (list, typing.List):
            values[f.name], bare = bare, []
        else:
            values[f.name], bare = bare[0], bare[1:]
    if bare:
        raise FirstKDError(f"unexpected argument {bare[0]!r}: options are --flag value or key=value")
    source = f"{config_path}" if config_path else "the command line"
    return build(cls, values, source)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(cfg, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def builtin_names(directory: Path) -> list[str]:
    """Names of the built-in YAML files shipped in `directory` (configs/programs, configs/traces)."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


def builtin_or_file(name_or_file: str, directory: Path, flag: str, kind: str) -> Path:
    """The file of `name_or_file`: a path to a YAML file, or the name of a built-in one in `directory`; a
    one-line FirstKDError naming `flag` and the built-in names otherwise."""
    path = Path(name_or_file)
    if path.is_file():
        return path
    builtin = directory / f"{name_or_file}.yaml"
    if "/" not in name_or_file and builtin.is_file():
        return builtin
    raise FirstKDError(f"{flag} {name_or_file}: no such file and no built-in {kind} of that name (built-in: "
                       f"{', '.join(builtin_names(directory)) or 'none found'}); give a {kind} name or a YAML file")


def read_yaml_file(path: Path, what: str) -> tuple[object, str]:
    """(parsed YAML, text) of a built-in or user file; a syntax error is a one-line FirstKDError naming `what`
    (e.g. "program", "trace spec"), the file and the line."""
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise FirstKDError(f"{what} {path}{'' if line is None else f' line {line + 1}'} is not valid YAML: fix "
                           f"the syntax") from None
