"""Writing files so that no reader, and no crash, ever sees half of one.

`write_text_atomic` writes the text to a scratch file beside the target, flushes it to disk and renames
it over the target (a rename is atomic); `stage_text` is its first half, for a caller that must put
several files in place in an order of its own. `write_json_atomic` is the one writer of JSON files: strict
JSON (`clean_json` turns NaN/inf into null first where a value may be one). `name_errors` makes a failed
write say which file it was writing, and `file_sha256` is the digest outputs record of their files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterator


def stage_text(path: Path, text: str) -> Path:
    """`text` (UTF-8) written and flushed to disk at PATH.tmp beside `path`, not yet in place; returns
    PATH.tmp. Nothing is left behind when the write fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) all at once; `path.tmp` is the scratch file."""
    os.replace(stage_text(path, text), path)


def json_text(data, sort_keys: bool = False) -> str:
    """`data` as strict JSON text (indented, one trailing newline). A NaN or infinity is a ValueError: JSON has
    no such numbers (Python would write the non-JSON tokens NaN / Infinity); pass `clean_json(data)` where
    one may occur."""
    return json.dumps(data, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"


def write_json_atomic(path: Path, data, sort_keys: bool = False) -> None:
    """Replace `path` with `data` as strict JSON (`json_text`) all at once."""
    write_text_atomic(path, json_text(data, sort_keys))


def clean_json(value):
    """NaN/inf -> None, recursively (dicts, lists, tuples), so the value can be written as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


@contextlib.contextmanager
def name_errors(path: Path) -> Iterator[None]:
    """A failed write (a full disk) raises an OSError that names no file: within the block, such an error
    names `path`, the file being written, so the one-line error says where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
