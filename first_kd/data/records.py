"""Records in: read the records named by --data (a jsonl/json/parquet/csv file, a datasets.save_to_disk
directory, or a hub dataset name) as a `datasets.Dataset`, and tell their layout from the field names.

Every way a source can fail (a missing or mistyped path, an unknown file type, a bad JSON line, an empty
file, a saved dataset without the split asked for, a hub name that does not load) is one FirstKDError line
that names the source and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from first_kd.data.options import DataConfig
from first_kd.data.templates import prompt_layout
from first_kd.errors import FirstKDError

FORMATS = ("mcqa", "prompt-response")
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Suffixes that make a missing --data value read as a mistyped path rather than a hub dataset name.
_PATH_LIKE_SUFFIXES = set(FILE_LOADERS) | {".txt", ".tsv", ".arrow", ".gz", ".zst", ".xlsx", ".yaml", ".yml"}


def _root_message(exc: BaseException) -> str:
    """The innermost cause's first line: datasets wraps the useful message in generic ones."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _looks_like_path(name: str) -> bool:
    p = Path(name).expanduser()
    return (name.startswith((".", "/", "~")) or p.suffix.lower() in _PATH_LIKE_SUFFIXES
            or (len(p.parts) > 1 and Path(p.parts[0]).exists()))


def _no_records(source) -> FirstKDError:
    return FirstKDError(f"--data {source}: the dataset holds no records; point --data at non-empty "
                        f"data (or check --split)")


def _file_is_empty(path: Path, loader: str) -> bool:
    """Whether a file that `datasets` failed to read simply has no rows (it raises on those)."""
    try:
        if loader == "parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(str(path)).num_rows == 0
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if loader == "csv":
            return len(lines) <= 1  # a header and nothing else
        return "".join(lines).replace(" ", "") in ("", "[]")
    except Exception:
        return False


def _load_file(path: Path):
    import datasets

    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise FirstKDError(f"--data {path}: unknown file type '{path.suffix}'; use .jsonl, .json, "
                           f".parquet or .csv, or a datasets.save_to_disk directory")
    verbosity = datasets.logging.get_verbosity()
    # A reader failure is reported below on one line; datasets would log its own second line first.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        # The json builder reads both JSON lines and a single top-level JSON list.
        return datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as e:  # any reader failure is a problem with the file, reported on one line
        if _file_is_empty(path, loader):
            raise _no_records(path) from None
        bad = first_bad_json_line(path) if loader == "json" else None
        if bad is not None:
            raise FirstKDError(f"--data {path}: could not read it as json: line {bad[0]} is {bad[1]}; fix or "
                               f"remove that line") from None
        raise FirstKDError(f"--data {path}: could not read it as {loader} ({_root_message(e)}); "
                           f"fix the file or convert it to jsonl") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def first_bad_json_line(path: Path) -> Optional[tuple[int, str]]:
    """(line number, what is wrong) of the first line of a JSON file that is not what the json reader
    takes, or None when none is found. A file opening with '[' is one JSON document (a list of objects);
    anything else is JSON lines, one object per non-blank line."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return e.lineno, f"not valid JSON ({e.msg} at column {e.colno})"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return number, f"not valid JSON ({e.msg} at column {e.colno})"
        if not isinstance(value, dict):
            return number, f"a JSON {type(value).__name__}, not an object (JSON lines hold one object per line)"
    return None


def _load_dir(path: Path, split: str):
    import datasets

    source = path
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():  # a saved DatasetDict: load only the split asked for
        splits = json.loads(dict_file.read_text()).get("splits", [])
        if split not in splits:
            raise FirstKDError(f"--data {source}: no split '{split}'; set --split to one of {', '.join(splits)}")
        path = path / split
    state = path / "state.json"
    # `datasets` cannot load a saved dataset with no rows (it fails deep inside), so look first.
    if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
        raise _no_records(source)
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise FirstKDError(f"--data {source}: directory is not a datasets.save_to_disk folder; "
                           f"point --data at a data file or a saved dataset") from None
    except Exception as e:
        raise FirstKDError(f"--data {source}: could not load the saved dataset ({_root_message(e)}); "
                           f"save it again with save_to_disk") from None


def _load_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        raise FirstKDError(f"--data {name}: not a local path and loading it as a hub dataset "
                           f"(split '{split}') failed ({_root_message(e)}); check the name, the "
                           f"split and the network, or pass a local file") from None


def load_records(cfg: DataConfig):
    """Load the records named by `cfg.data` as a `datasets.Dataset` (first `cfg.limit` only).

    A file is read by its extension, a directory with `datasets.load_from_disk` (a DatasetDict gives
    `cfg.split`), and anything else that does not exist locally is tried as a hub dataset name.
    """
    if not cfg.data:
        raise FirstKDError("no data given: set --data to a jsonl/json/parquet/csv file, a saved "
                           "dataset directory or a hub dataset name")
    path = Path(cfg.data).expanduser()
    if path.is_dir():
        ds = _load_dir(path, cfg.split)
    elif path.is_file():
        ds = _load_file(path)
    elif _looks_like_path(cfg.data):
        raise FirstKDError(f"--data {cfg.data}: file not found; check the path")
    else:
        ds = _load_hub(cfg.data, cfg.split)
    if cfg.limit is not None and cfg.limit < len(ds):
        ds = ds.select(range(cfg.limit))
    if len(ds) == 0:
        raise _no_records(cfg.data)
    return ds


def detect_format(ds, cfg: DataConfig) -> str:
    """"mcqa" or "prompt-response": `cfg.format` when forced, else told from the column names."""
    if cfg.format != "auto":
        return cfg.format
    columns = set(ds.column_names)
    is_mcqa = cfg.question_field in columns and cfg.choices_field in columns
    is_prompt = prompt_layout(columns, cfg) is not None
    if is_mcqa and is_prompt:
        raise FirstKDError(f"the data has both MCQA fields ({cfg.question_field}, {cfg.choices_field}) "
                           f"and prompt-response fields: set --format mcqa or --format prompt-response")
    if is_mcqa:
        return "mcqa"
    if is_prompt:
        return "prompt-response"
    raise FirstKDError(
        f"cannot tell the data layout from its fields ({', '.join(ds.column_names)}): MCQA needs "
        f"'{cfg.question_field}' + '{cfg.choices_field}' (set --question-field/--choices-field), "
        f"prompt-response needs '{cfg.instruction_field}' + '{cfg.output_field}' "
        f"(--instruction-field/--output-field) or '{cfg.prompt_field}' + '{cfg.response_field}' "
        f"(--prompt-field/--response-field); or set --format")
