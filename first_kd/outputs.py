"""What every command that writes an output promises, written once.

* **Same command twice is a no-op.** An output records the settings that made it. Re-running the very
  same command on a finished output says so and exits 0 (batch schedulers re-run jobs after preemption);
  other settings on the same output are refused with one line naming the first differences.
* **Nothing finished is lost.** A new output is built beside the old one (`staged_dir`) and swapped in
  only once it is complete; a failure (bad input, full disk, kill) leaves the old output as it was.
* **One writer at a time.** `exclusive_lock` takes an advisory lock beside an output, so a second process
  on the same output stops with a clear message instead of racing the first.
* **Crash points** let tests SIGKILL a command at an exact place (`FIRST_KD_CRASH_AT=name`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Iterator, Mapping, Optional

from first_kd.errors import FirstKDError

STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"


def crash_point(name: str) -> None:
    """Testing hook: FIRST_KD_CRASH_AT=name makes the process SIGKILL itself here, so tests can kill a
    command at exact points (after planning, between a unit's rows and its done-marker, ...). A process
    that leads its own process group (started with start_new_session) kills the whole group, as `kill -9`
    of a job does: the vLLM engine's processes die with it."""
    if os.environ.get("FIRST_KD_CRASH_AT") == name:
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def settings_diff(old: Mapping, new: Mapping, keys: Optional[list] = None, limit: int = 4) -> str:
    """'' when `old` and `new` agree on `keys` (default: every key of either), else a short text naming
    the first `limit` differences as `key: old -> new`."""
    names = sorted(set(old) | set(new)) if keys is None else list(keys)
    changed = [k for k in names if old.get(k) != new.get(k)]
    if not changed:
        return ""
    text = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:limit])
    return text + (f" (+{len(changed) - limit} more)" if len(changed) > limit else "")


def say_done(command: str, out, what: str) -> int:
    """The no-op of a re-run on a finished output: one line on stderr, exit code 0."""
    print(f"first-kd {command}: {out} already holds {what} made with these settings: nothing to do "
          "(pass --overwrite to redo it)", file=sys.stderr)
    return 0


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it, a new file) to disk; best effort (some filesystems
    cannot open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)




def clear_stale(final: Path) -> None:
    """Remove leftovers of an interrupted `staged_dir` beside `final` (a kill between its steps)."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return
    for prefix in (STAGING_PREFIX, RETIRED_PREFIX):
        stale = parent / f"{prefix}{final.name}"
        if stale.exists():
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Build a directory beside `final` and put it in place only when the block finishes.

    Yields an empty scratch directory (`.staging-NAME` beside `final`). On success the old `final` (if
    any) is renamed aside, the scratch directory renamed to `final`, and the old one removed: at every
    instant `final` is either the complete old output or the complete new one. On any error the scratch
    directory is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(final)
    staging = final.parent / f"{STAGING_PREFIX}{final.name}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = final.parent / f"{RETIRED_PREFIX}{final.name}"
    if final.exists():
        os.replace(final, retired)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(target: Path, command: str) -> Iterator[None]:
    """Hold an advisory lock on `target` (a file `.NAME.lock` beside it) for the block.

    A second process asking for the same lock gets a one-line FirstKDError at once instead of waiting
    or racing. The lock dies with its process (kill -9 included), so a crashed run never blocks a re-run.
    """
    import fcntl

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FirstKDError(f"another `first-kd {command}` is writing {target} (lock {lock_path} is held): "
                               "wait for it to finish, or choose another --out") from None
        yield
    finally:
        handle.close()  # closing releases the lock; the empty lock file stays, harmlessly


def writable_parent(out: Path, flag: str = "--out") -> Path:
    """Create the folder that output `out` goes in, or stop with one line saying why nothing can be written
    there (a file where a folder should be, a folder that cannot be created, a read-only folder). Called
    before any heavy work, so a bad --out costs nothing. Returns the folder."""
    out = Path(out)
    parent = out.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise FirstKDError(f"{flag} {out}: {blocker} is a file, not a folder, so nothing can be written under it: "
                           f"choose an {flag} in a writable folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FirstKDError(f"{flag} {out}: cannot create its folder {parent} ({e.strerror or e}): choose an {flag} "
                           "in a writable folder") from None
    if not os.access(parent, os.W_OK):
        raise FirstKDError(f"{flag} {out}: the folder {parent} is read-only: make it writable or choose another "
                           f"{flag}")
    return parent
