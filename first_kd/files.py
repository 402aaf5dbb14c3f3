"""Writing a file so that no reader, and no crash, ever leaves half of it: the text goes to a temporary
file beside the target, is flushed to disk, and is renamed over the target (a rename is atomic)."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) all at once; `path.tmp` is the scratch file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
