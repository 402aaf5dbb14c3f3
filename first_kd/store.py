"""The top-k store: one zarr v3 group holding a teacher's top-k log-probs at every target position.

Layout (see cache/README.md for the full description):

    seq_offsets      int64   [n_sequences + 1]  sequence i's tokens are input_ids[seq_offsets[i]:seq_offsets[i+1]]
    input_ids        uint    [n_tokens]
    pos_offsets      int64   [n_sequences + 1]  sequence i's positions are rows pos_offsets[i]:pos_offsets[i+1]
    target_positions uint    [n_positions]      index t in the sequence whose logits predict input_ids[t + 1]
    topk_ids         uint    [n_positions, k]   ids by decreasing teacher probability
    topk_logprobs    float16 [n_positions, k]   full-vocabulary log-softmax at temperature 1
    example_ids      str     [n_sequences]
    answer_index     int16   [n_sequences]      multiple-choice only: gold option index
    n_choices        int16   [n_sequences]      multiple-choice only
    units_done       uint8   [n_units]          1 when the teacher rows of unit u are written (resume)
    topk_count       uint    [n_positions]      top-p and sampled stores: the real columns of each row
    sample_counts    uint8   [n_positions, k]   sampled stores: how often each stored id was drawn (0 = padding)

What a row holds is the store's `selection` attribute (absent in stores written before it: top-k):
  * {"kind": "top-k", "k": k}: the k most probable ids.
  * {"kind": "top-p", "p": p, "k": k}: variable k: the smallest prefix of the top-k whose mass reaches p
    (all k when the top-k holds less), then padding.
  * {"kind": "sampled", "n": n, "k": n, "proposal": "teacher", "proposal_temperature": 1.0, "seed": s}: the
    distinct ids of n draws with replacement from the teacher's softmax at temperature 1 (RS-KD), by
    decreasing probability, with their counts in `sample_counts`; then padding.
A padding column holds the id dtype's largest value and log-prob -inf on disk (constants that the
compressor all but removes); `read` gives id -1 and log-prob -inf there, the convention of
first_kd.losses and first_kd.temperature.

The rows of the top-k arrays are cut into *units* of `chunk_positions` rows, one zarr chunk each. A unit
is the grain of work, of resume and of multi-process splitting: each process writes whole chunks only,
so no two processes ever touch the same chunk file, and `units_done[u]` (a chunk of its own) is set
only after unit u's rows are on disk. `complete` is set last, after every unit is done.

Temperature is not baked into the arrays: it lives in the `temperature` attribute and is applied when
reading (first_kd.temperature), so re-calibrating never re-runs the teacher.

This module is the format: planning and writing a store (`first-kd cache`, first_kd.commands.cache),
recording temperature fits (`first-kd calibrate`), reading it (`open_store`) and checking every
invariant (`verify`, which `first-kd inspect` reports). `coverage_summary` measures the top-k mass of a
written store (first_kd.coverage), which `cache` records as the `coverage` attribute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from first_kd.coverage import MassAccumulator
from first_kd.errors import FirstKDError
from first_kd.outputs import crash_point, fsync_dir

FORMAT_NAME = "first-kd-topk"
FORMAT_VERSION = 1

TOPK_ARRAYS = ("topk_ids", "topk_logprobs", "topk_count", "sample_counts")  # the teacher payload (those present)
SELECTIONS = ("top-k", "top-p", "sampled")
PAD_ID = -1  # the id of a padding column as `read` returns it
MAX_SAMPLE_DRAWS = 255  # sample_counts is uint8
# Arrays written before the teacher runs (planning); the rest are filled unit by unit.
PLAN_ARRAYS = ("seq_offsets", "input_ids", "pos_offsets", "target_positions", "example_ids")

# zstd + shuffle: ids of frequent tokens share high bytes and fp16 log-probs share sign/exponent bytes;
# crc32c makes a truncated or corrupted chunk fail loudly instead of decoding to garbage.
_COMPRESSORS = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())
_WRITE_CONFIG = {"write_empty_chunks": True}  # every chunk exists on disk, so a missing one means damage

# fp16 rounding can push the summed top-k mass a hair above 1 and a log-prob of -0.0001 to 0.
MASS_TOLERANCE = 2e-3


def compact_uint(max_value: int) -> str:
    """The smallest unsigned dtype holding values 0..max_value."""
    for dtype in ("uint8", "uint16", "uint32"):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    return "uint64"


def _create(group, name, shape, chunks, dtype, fill_value):
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill_value,
        compressors=_COMPRESSORS,
        config=_WRITE_CONFIG,
        overwrite=True,
    )


# ----------------------------------------------------------------------------------------------
# Tokenizer fingerprint
# ----------------------------------------------------------------------------------------------

_SPECIAL = ("bos_token", "eos_token", "unk_token")


def _vocab_digest(tokenizer, size: int) -> str:
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    h = hashlib.sha256()
    for i in range(size):
        h.update(f"{i}\t{by_id.get(i, '')}\n".encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """What must match between teacher and student tokenizers: the id -> token map and special tokens.

    `size` is the number of ids covered; a student may have more (padded vocabularies) as long as its
    first `size` ids map to the same tokens.
    """
    size = max(tokenizer.get_vocab().values()) + 1
    special = {name: getattr(tokenizer, name + "_id", None) for name in _SPECIAL}
    return {"sha256": _vocab_digest(tokenizer, size), "size": size, "special_token_ids": special,
            "class": type(tokenizer).__name__}


def check_tokenizer(store, tokenizer, model_vocab_size: Optional[int] = None) -> None:
    """Raise FirstKDError unless `tokenizer` (and a model with `model_vocab_size` logits) can learn from `store`."""
    attrs = store.attrs if hasattr(store, "attrs") else store
    expected = attrs["tokenizer"]
    size = expected["size"]
    got_size = max(tokenizer.get_vocab().values()) + 1
    if got_size < size or _vocab_digest(tokenizer, size) != expected["sha256"]:
        raise FirstKDError(
            f"student tokenizer ({type(tokenizer).__name__}, {got_size} ids) does not match the store's "
            f"teacher tokenizer ({expected['class']}, {size} ids): cached token ids would mean different "
            "tokens; use a student from the teacher's tokenizer family or re-cache with a matching teacher"
        )
    for name, want in expected["special_token_ids"].items():
        have = getattr(tokenizer, name + "_id", None)
        if want is not None and have is not None and have != want:
            raise FirstKDError(
                f"student tokenizer's {name} id is {have} but the store's is {want}: use the teacher's "
                "tokenizer (or one with the same special tokens) for the student"
            )
    if model_vocab_size is not None and model_vocab_size <= attrs["max_token_id"]:
        raise FirstKDError(
            f"student model has {model_vocab_size} output logits but the store holds token id "
            f"{attrs['max_token_id']}: the student's vocabulary must cover the teacher's"
        )


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def is_store(path: Path) -> bool:
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT_NAME
    except Exception:
        return False


def remove_store(path: Path) -> None:
    """Delete a first-kd store; refuse anything else, so --overwrite can never eat a user's folder."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir() and (is_store(path) or not any(path.iterdir())):
        shutil.rmtree(path)
        return
    raise FirstKDError(f"{path} exists and is not a first-kd store: refusing to overwrite it; choose another --out")


def selection_of(attrs: dict) -> dict:
    """A store's `selection` record; stores written before it existed are top-k."""
    return dict(attrs.get("selection") or {"kind": "top-k", "k": int(attrs["k"])})


def describe_selection(selection: dict) -> str:
    """The one way a selection is named to people: "top-5", "top-p 0.95 (k <= 64)", "sampled 12 draws"."""
    kind = selection["kind"]
    if kind == "top-p":
        return f"top-p {selection['p']:g} (k <= {selection['k']})"
    if kind == "sampled":
        return f"sampled {selection['n']} draws"
    return f"top-{selection['k']}"


@dataclasses.dataclass
class Plan:
    """Everything about a pass that is known before the teacher runs."""

    n_sequences: int
    n_tokens: int
    n_positions: int
    k: int
    chunk_positions: int
    selection: Optional[dict] = None  # None: top-k

    @property
    def n_units(self) -> int:
        return max(1, math.ceil(self.n_positions / self.chunk_positions))


def create_store(path: Path, tokenized, plan: Plan, attrs: dict, vocab_size: int) -> zarr.Group:
    """Write the planning arrays (token ids, offsets, target positions) and empty top-k arrays.

    `tokenized` is a datasets.Dataset with columns id, input_ids, target_start, answer_index, n_choices.
    Memory stays bounded: rows are streamed in blocks from the Arrow table.
    """
    import pyarrow.compute as pc

    root = zarr.open_group(str(path), mode="w")
    # Mark the store as ours but unfinished before anything else, so an interrupted planning is
    # recognised (and redone) rather than mistaken for a foreign folder.
    root.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "stage": "planning",
                       "complete": False})
    n_seq, n_tok, n_pos = plan.n_sequences, plan.n_tokens, plan.n_positions
    seq_chunk = 1 << 16
    id_dtype = compact_uint(max(vocab_size, attrs["tokenizer"]["size"]) - 1)
    pos_dtype = compact_uint(max(attrs["max_length"], 1))

    seq_offsets = _create(root, "seq_offsets", (n_seq + 1,), (seq_chunk,), "int64", -1)
    pos_offsets = _create(root, "pos_offsets", (n_seq + 1,), (seq_chunk,), "int64", -1)
    input_ids = _create(root, "input_ids", (max(n_tok, 1),), (1 << 18,), id_dtype, np.iinfo(id_dtype).max)
    target_positions = _create(root, "target_positions", (max(n_pos, 1),), (1 << 18,), pos_dtype,
                               np.iinfo(pos_dtype).max)
    example_ids = root.create_array("example_ids", shape=(n_seq,), chunks=(seq_chunk,), dtype=str,
                                    compressors=_COMPRESSORS, config=_WRITE_CONFIG, overwrite=True)
    is_mcqa = attrs["data"]["format"] == "mcqa"
    if is_mcqa:
        answer_index = _create(root, "answer_index", (n_seq,), (seq_chunk,), "int16", -1)
        n_choices = _create(root, "n_choices", (n_seq,), (seq_chunk,), "int16", -1)
    rows = (plan.chunk_positions, plan.k)
    _create(root, "topk_ids", (max(n_pos, 1), plan.k), rows, id_dtype, np.iinfo(id_dtype).max)
    _create(root, "topk_logprobs", (max(n_pos, 1), plan.k), rows, "float16", float("nan"))
    _create(root, "units_done", (plan.n_units,), (1,), "uint8", 0)
    kind = (plan.selection or {}).get("kind", "top-k")
    if kind != "top-k":
        _create(root, "topk_count", (max(n_pos, 1),), (plan.chunk_positions,), compact_uint(plan.k), 0)
    if kind == "sampled":
        _create(root, "sample_counts", (max(n_pos, 1), plan.k), rows, "uint8", 0)

    # Stream sequences in blocks; offsets are computed from lengths so no Python loop per token.
    tok_at, pos_at, seq_at = 0, 0, 0
    seq_offsets[0:1] = [0]
    pos_offsets[0:1] = [0]
    table = tokenized.data
    block = 1 << 14
    for start in range(0, n_seq, block):
        part = table.slice(start, block)
        ids_col = part.column("input_ids").combine_chunks()
        lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(ids_col).to_numpy(zero_copy_only=False)
        starts = part.column("target_start").to_numpy().astype(np.int64)
        n_targets = lengths - starts
        m = len(lengths)
        seq_offsets[seq_at + 1: seq_at + 1 + m] = tok_at + np.cumsum(lengths)
        pos_offsets[seq_at + 1: seq_at + 1 + m] = pos_at + np.cumsum(n_targets)
        input_ids[tok_at: tok_at + len(flat)] = flat.astype(id_dtype)
        # positions t = target_start-1 .. len-2 predict the target tokens input_ids[t+1]
        first_pos = np.repeat(starts - 1, n_targets)
        within = np.arange(int(n_targets.sum())) - np.repeat(np.cumsum(n_targets) - n_targets, n_targets)
        target_positions[pos_at: pos_at + len(within)] = (first_pos + within).astype(pos_dtype)
        example_ids[seq_at: seq_at + m] = np.array([str(x) for x in part.column("id").to_pylist()], dtype=object)
        if is_mcqa:
            answer_index[seq_at: seq_at + m] = part.column("answer_index").to_numpy().astype(np.int16)
            n_choices[seq_at: seq_at + m] = part.column("n_choices").to_numpy().astype(np.int16)
        tok_at += len(flat)
        pos_at += int(n_targets.sum())
        seq_at += m
    attrs = dict(attrs, stage="planned", complete=False, format=FORMAT_NAME, format_version=FORMAT_VERSION,
                 k=plan.k, chunk_positions=plan.chunk_positions, n_units=plan.n_units, vocab_size=vocab_size,
                 counts={"n_sequences": n_seq, "n_tokens": n_tok, "n_positions": n_pos}, temperature={},
                 selection=dict(plan.selection or {"kind": "top-k", "k": plan.k}))
    root.attrs.update(attrs)
    return root


def unit_rows(group: zarr.Group, unit: int) -> tuple[int, int]:
    cp = group.attrs["chunk_positions"]
    n_pos = group.attrs["counts"]["n_positions"]
    return unit * cp, min((unit + 1) * cp, n_pos)


def unit_sequences(group: zarr.Group, unit: int, seq_offsets: np.ndarray, pos_offsets: np.ndarray
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """What the teacher must see to fill `unit`: the sequences owning its rows (int64 token ids) and, for
    each, its target positions whose rows are in the unit; in store order, so their rows one after the
    other are the unit's rows. `seq_offsets` and `pos_offsets` are the store's offset arrays (read once
    by the caller: `group["seq_offsets"][:]`)."""
    lo, hi = unit_rows(group, unit)
    first = int(np.searchsorted(pos_offsets, lo, side="right")) - 1
    last = int(np.searchsorted(pos_offsets, hi, side="left"))
    base = int(seq_offsets[first]) if last > first else 0
    # The unit's sequences are contiguous in input_ids and its rows in target_positions: one read each.
    tokens = group["input_ids"][base: int(seq_offsets[last]) if last > first else 0].astype(np.int64)
    targets = group["target_positions"][lo:hi].astype(np.int64)
    sequences, positions = [], []
    for i in range(first, last):
        sequences.append(tokens[int(seq_offsets[i]) - base: int(seq_offsets[i + 1]) - base])
        positions.append(targets[max(int(pos_offsets[i]), lo) - lo: min(int(pos_offsets[i + 1]), hi) - lo])
    return sequences, positions


def read_sequences(group: zarr.Group, indices: np.ndarray, seq_offsets: np.ndarray, pos_offsets: np.ndarray
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Sequences `indices` (ascending) as the teacher sees them: their token ids and all their target
    positions (int64 1-D arrays each). Reads go through a small chunk cache, so each chunk is decoded once."""
    tokens, targets = _ChunkedReader(group["input_ids"]), _ChunkedReader(group["target_positions"])
    sequences, positions = [], []
    for i in map(int, indices):
        sequences.append(tokens[slice(int(seq_offsets[i]), int(seq_offsets[i + 1]))].astype(np.int64))
        positions.append(targets[slice(int(pos_offsets[i]), int(pos_offsets[i + 1]))].astype(np.int64))
    return sequences, positions


def coverage_summary(group: zarr.Group) -> dict:
    """The coverage summary of a store whose units are all written (first_kd.coverage.MassAccumulator over
    its stored fp16 log-probs, read chunk by chunk from row 0): what `cache` records as `coverage`."""
    arr = group["topk_logprobs"]
    n_pos, step = group.attrs["counts"]["n_positions"], arr.chunks[0]
    acc = MassAccumulator()
    for lo in range(0, n_pos, step):
        acc.add(arr[lo: min(lo + step, n_pos)])
    return acc.summary()


def max_token_id(group: zarr.Group) -> int:
    """Largest id a student must be able to output: of the tokens and of the stored ids (padding aside)."""
    top = 0
    arr = group["input_ids"]
    for lo in range(0, arr.shape[0], arr.chunks[0]):
        top = max(top, int(arr[lo: lo + arr.chunks[0]].max()))
    step = group["topk_ids"].chunks[0]
    for lo in range(0, group["topk_ids"].shape[0], step):
        ids, _ = read_rows(group, lo, lo + step)
        top = max(top, int(ids.max()))
    return top


def pending_units(group: zarr.Group) -> list[int]:
    """Units whose rows are not known to be on disk (a torn marker chunk counts as not done)."""
    done = group["units_done"]
    pending = []
    for u in range(done.shape[0]):
        try:
            ok = bool(done[u])
        except Exception:
            ok = False
        if not ok:
            pending.append(u)
    return pending


def write_unit(group: zarr.Group, unit: int, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
               crash_hook=None, sample_counts: Optional[np.ndarray] = None) -> None:
    """Write one unit's rows, then mark it done (the order is what makes resume safe).

    topk_ids [n, k] / topk_logprobs [n, k]: a padding column (top-p and sampled stores) has log-prob -inf;
    sample_counts [n, k] (sampled stores): draws per id, 0 at padding."""
    lo, hi = unit_rows(group, unit)
    if topk_ids.shape[0] != hi - lo:
        raise RuntimeError(f"unit {unit}: expected {hi - lo} rows, got {topk_ids.shape[0]}")
    if hi > lo:
        pad = np.asarray(topk_logprobs) == -np.inf
        fill = np.iinfo(group["topk_ids"].dtype).max
        group["topk_ids"][lo:hi] = np.where(pad, fill, topk_ids).astype(group["topk_ids"].dtype)
        # A real log-prob below fp16's range is kept at its floor, so -inf always means padding.
        real = np.clip(topk_logprobs, float(np.finfo(np.float16).min), 0.0)
        group["topk_logprobs"][lo:hi] = np.where(pad, -np.inf, real).astype(np.float16)
        if "topk_count" in group:
            group["topk_count"][lo:hi] = (~pad).sum(axis=1).astype(group["topk_count"].dtype)
        if "sample_counts" in group:
            group["sample_counts"][lo:hi] = np.where(pad, 0, sample_counts).astype(np.uint8)
    if crash_hook:
        crash_hook(f"unit-rows:{unit}")
    group["units_done"][unit] = 1


def update_attrs(path, changes: dict, remove: tuple = ()) -> None:
    """Change a store's group attributes with one atomic replace of its `zarr.json`.

    zarr's own attribute write stages `zarr.<uuid>.partial` inside the store; a kill at the wrong moment
    leaves that file behind and every later open warns about it. Here the new metadata is written and
    flushed beside the store (`.NAME.zarr.json.tmp` in its parent) and renamed over `zarr.json`, so the
    store holds either the old attributes or the new ones, and never a stray file.
    """
    path = Path(path)
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    attrs = meta.setdefault("attributes", {})
    attrs.update(changes)
    for key in remove:
        attrs.pop(key, None)
    tmp = path.parent / f".{path.name}.zarr.json.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(meta, indent=2))
            f.flush()
            os.fsync(f.fileno())
        crash_point("attrs-before-replace")
        os.replace(tmp, meta_path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:  # a failed write() names no file: name the store
            e.filename = str(path)
        raise
    fsync_dir(path)


def clear_partials(path) -> int:
    """Remove zarr's `*.partial` staging files left in a store by a killed write; returns how many.

    Only for a writer holding the store's lock: a live writer's staging files look the same."""
    removed = 0
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                Path(root, name).unlink(missing_ok=True)
                removed += 1
    return removed


def _group_path(group: zarr.Group) -> Optional[Path]:
    root = getattr(group.store, "root", None)
    return Path(root) / group.path if root is not None else None


def mark_complete(group: zarr.Group, extra: dict) -> None:
    changes = dict(extra, stage="complete", complete=True)
    path = _group_path(group)
    if path is None:  # not a local directory: zarr's own write
        group.attrs.update(changes)
    else:
        update_attrs(path, changes)


def set_temperature(path, record: dict) -> None:
    """Replace one store's temperature record (the arrays are untouched). `first-kd calibrate` writes a
    pair of stores with `record_fit`, which keeps them consistent."""
    update_attrs(path, {"temperature": dict(record)})


# A fit is written to two stores, which no filesystem can change at once. `record_fit` first marks the
# training store `temperature_pending` (the fit it is about to hold), then writes the held-out store, then
# the training store's record, clearing the mark in the same replace. A kill or a full disk in between
# leaves the mark, which readers of the temperature refuse (naming the fix) and a re-run of the same
# `first-kd calibrate` finishes; so the two stores never silently disagree.
PENDING_KEY = "temperature_pending"


def record_fit(train_path, val_path, record: dict) -> None:
    """Write the fit `record` (which carries its `fit_id`) into both stores of a calibration."""
    update_attrs(train_path, {PENDING_KEY: dict(record)})
    crash_point("calibrate-pending")
    set_temperature(val_path, record)
    crash_point("calibrate-val-written")
    update_attrs(train_path, {"temperature": dict(record)}, remove=(PENDING_KEY,))


def pending_fit_problem(path, attrs: dict) -> str:
    """The one-line problem of a store whose calibration was interrupted between its two writes, or ''."""
    pending = attrs.get(PENDING_KEY)
    if not pending:
        return ""
    stores = pending.get("stores") or {}
    val = stores.get("val") or (pending.get("fitted_on") or {}).get("path") or "VAL_STORE"
    return (f"store {path} holds a half-written calibration (`first-kd calibrate` stopped between writing "
            f"{val} and this store, fit {pending.get('fit_id')}), so its temperature is unknown: re-run "
            f"`first-kd calibrate --store {stores.get('train') or path} --val-store {val}` to finish it")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def resume_hint(path) -> str:
    """How to finish an incomplete store (the advice of every reader that refuses one)."""
    return f"re-run the same `first-kd cache ... --out {path}` command to resume it"


class _ChunkedReader:
    """Random access to a zarr array with the decoded chunks kept in a small LRU cache. `decodes` counts
    the chunks decoded so far (what a read order costs: first_kd.loader keeps it near one per chunk)."""

    def __init__(self, array, max_chunks: int = 16):
        self.array = array
        self.chunk = array.chunks[0]
        self.max_chunks = max_chunks
        self.decodes = 0
        self._get = lru_cache(maxsize=max_chunks)(self._load)

    def __getstate__(self) -> dict:
        # The cache is per process: a DataLoader worker started by `spawn` (macOS, Windows) gets a fresh one.
        return {"array": self.array, "max_chunks": self.max_chunks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["array"], state["max_chunks"])

    def _load(self, c: int) -> np.ndarray:
        self.decodes += 1
        return self.array[c * self.chunk: (c + 1) * self.chunk]

    def __getitem__(self, sl: slice) -> np.ndarray:
        lo, hi = sl.start, sl.stop
        if hi <= lo:
            return self.array[lo:lo]
        first, last = lo // self.chunk, (hi - 1) // self.chunk
        parts = [self._get(c) for c in range(first, last + 1)]
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        off = first * self.chunk
        return data[lo - off: hi - off]


READ_ARRAYS = ("input_ids", "target_positions", "topk_ids", "topk_logprobs")  # what reading a sequence decodes


def padded_ids(ids: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """Stored ids [n, k] as int64 with PAD_ID where the log-prob is -inf (a padding column)."""
    ids = ids.astype(np.int64)
    pad = logprobs == -np.inf
    if pad.any():
        ids[pad] = PAD_ID
    return ids


def read_rows(group: zarr.Group, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Store rows lo..hi as readers use them: (ids [n, k] int64, PAD_ID at padding; log-probs [n, k] float32,
    -inf at padding)."""
    logprobs = group["topk_logprobs"][lo:hi].astype(np.float32)
    return padded_ids(group["topk_ids"][lo:hi], logprobs), logprobs


class TopKStore:
    """Read-only view of a complete store. `store[i]` is sequence i (see `get`)."""

    def __init__(self, path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.attrs = dict(group.attrs)
        self.k = int(self.attrs["k"])
        self.vocab_size = int(self.attrs["vocab_size"])
        self._seq_offsets = group["seq_offsets"][:]
        self._pos_offsets = group["pos_offsets"][:]
        self.selection = selection_of(self.attrs)
        self.sampled = self.selection["kind"] == "sampled"
        self._read_arrays = READ_ARRAYS + (("sample_counts",) if self.sampled else ())
        self._readers = {name: _ChunkedReader(group[name]) for name in self._read_arrays}
        self._ids = None
        self._mcqa = {name: group[name][:] for name in ("answer_index", "n_choices") if name in group}

    @property
    def temperature(self) -> dict:
        """The recorded temperature ({} = none); FirstKDError when a calibration was interrupted half-way."""
        problem = pending_fit_problem(self.path, self.attrs)
        if problem:
            raise FirstKDError(problem)
        return dict(self.attrs.get("temperature") or {})

    @property
    def choice_token_ids(self) -> list[int]:
        """Token ids of the option letters of a multiple-choice store ([] for prompt/response data)."""
        data = self.attrs.get("data") or {}
        return [int(i) for i in data.get("choice_token_ids") or []] if data.get("format") == "mcqa" else []

    @property
    def n_positions(self) -> int:
        return int(self._pos_offsets[-1])

    def __len__(self) -> int:
        return len(self._seq_offsets) - 1

    def example_id(self, i: int) -> str:
        if self._ids is None:
            self._ids = self.group["example_ids"][:]
        return str(self._ids[i])

    def read(self, i: int) -> dict:
        """Sequence i as stored, with no distribution computed: input_ids [L], target_positions [n],
        topk_ids [n, k] int64 (PAD_ID at padding), topk_logprobs [n, k] float32 (temperature 1; -inf at
        padding), sample_counts [n, k] int64 for a sampled store, and answer_index / n_choices for
        multiple-choice data. The training loader reads this and computes the teacher distribution once per
        batch (first_kd.training.TeacherTargets)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        t0, t1 = int(self._seq_offsets[i]), int(self._seq_offsets[i + 1])
        p0, p1 = int(self._pos_offsets[i]), int(self._pos_offsets[i + 1])
        try:
            logprobs = self._readers["topk_logprobs"][slice(p0, p1)].astype(np.float32)
            record = {
                "input_ids": self._readers["input_ids"][slice(t0, t1)].astype(np.int64),
                "target_positions": self._readers["target_positions"][slice(p0, p1)].astype(np.int64),
                "topk_ids": padded_ids(self._readers["topk_ids"][slice(p0, p1)], logprobs),
                "topk_logprobs": logprobs,
            }
            if self.sampled:
                record["sample_counts"] = self._readers["sample_counts"][slice(p0, p1)].astype(np.int64)
        except Exception as e:  # a torn chunk fails its checksum here
            raise FirstKDError(f"store {self.path} is damaged ({type(e).__name__}: {e}); run `first-kd inspect "
                               f"{self.path}` and re-create it with `first-kd cache ... --overwrite`") from None
        for name, values in self._mcqa.items():
            record[name] = int(values[i])
        return record

    def get(self, i: int, temperature: bool = True, other_bucket: bool = False) -> dict:
        """Sequence i (`read`) with its id and teacher_probs [n, k] (or [n, k+1] with other_bucket) after
        the recorded temperature."""
        import torch

        from first_kd.temperature import distribution_from_record

        stored = self.read(i)  # checks i first
        record = {"id": self.example_id(i), **stored}
        record["teacher_probs"] = distribution_from_record(
            torch.from_numpy(record["topk_logprobs"]), self.temperature if temperature else None, other_bucket
        ).numpy()
        return record

    def sequence_lengths(self) -> np.ndarray:
        """Tokens of every sequence: int64 [n_sequences]."""
        return np.diff(self._seq_offsets)

    def read_blocks(self) -> np.ndarray:
        """The read block of every sequence: int64 [n_sequences], nondecreasing. Sequences of one block
        start in the same chunk of every array `read` decodes, so reading a block decodes about one chunk
        per array; an order that keeps to a few blocks at a time (first_kd.loader) reads each chunk once."""
        n = len(self)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        starts = {name: self._pos_offsets[:-1] for name in self._read_arrays}
        starts["input_ids"] = self._seq_offsets[:-1]
        change = np.zeros(n, dtype=bool)
        change[0] = True
        for name, first in starts.items():
            chunk = first // self._readers[name].chunk
            change[1:] |= chunk[1:] != chunk[:-1]
        return np.cumsum(change) - 1

    def set_chunk_cache(self, max_chunks: int) -> None:
        """Keep up to `max_chunks` decoded chunks per array (16 by default); drops the chunks cached now."""
        self._readers = {name: _ChunkedReader(self.group[name], max_chunks) for name in self._read_arrays}

    @property
    def chunk_decodes(self) -> int:
        """Chunks decoded by this process's reads so far, all arrays together."""
        return sum(reader.decodes for reader in self._readers.values())

    __getitem__ = get

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self.get(i)


def open_store(path, require_complete: bool = True, sampled_ok: bool = False) -> TopKStore:
    """Open a store for reading; one-line FirstKDError when it is missing, foreign, incomplete or damaged, or
    a sampled store and the caller does not read those (`sampled_ok`: only distill's sampled loss and inspect
    do; a sampled row is a random sample, not the teacher's most probable ids)."""
    path = Path(path)
    if not path.exists():
        raise FirstKDError(f"store not found: {path} (create it with `first-kd cache --out {path}`)")
    try:
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
    except Exception:
        raise FirstKDError(f"{path} is not a readable zarr store: check the path") from None
    if attrs.get("format") != FORMAT_NAME:
        raise FirstKDError(f"{path} is not a first-kd top-k store (no '{FORMAT_NAME}' format attribute)")
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise FirstKDError(f"{path} uses store format {attrs['format_version']}, newer than this first-kd "
                           f"({FORMAT_VERSION}): upgrade first-kd")
    selection = selection_of(attrs) if "k" in attrs else {"kind": "top-k"}
    if selection["kind"] == "sampled" and not sampled_ok:
        raise FirstKDError(f"store {path} is a sampled cache ({describe_selection(selection)} per position), which "
                           "only `first-kd distill` and `first-kd inspect` read: cache a top-k or top-p store "
                           "(--k / --top-p) for this command")
    if require_complete and not attrs.get("complete"):
        raise FirstKDError(f"store {path} is incomplete (the teacher pass did not finish): {resume_hint(path)}")
    if require_complete:
        missing = _missing_chunks(group)
        if missing:
            raise FirstKDError(f"store {path} is damaged ({missing}): re-create it with `first-kd cache ... --overwrite`")
    return TopKStore(path, group)


def _missing_chunks(group: zarr.Group) -> str:
    for name, arr in group.arrays():
        if arr.nchunks_initialized != arr.nchunks:
            return f"array {name} has {arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunks missing"
    return ""


# ----------------------------------------------------------------------------------------------
# Verification (what `first-kd inspect` reports)
# ----------------------------------------------------------------------------------------------

def bytes_on_disk(path: Path, prefix: str = "", chunks_only: bool = False) -> int:
    """Bytes of the files under path/prefix; `chunks_only`: of the chunk files alone (no zarr.json metadata,
    whose few hundred bytes per array would dominate the per-position cost of a small store)."""
    root = Path(path) / prefix if prefix else Path(path)
    return sum(f.stat().st_size for f in root.rglob("*")
               if f.is_file() and not (chunks_only and f.name == "zarr.json"))


class DamagedStore(Exception):
    """A store that breaks an invariant of the format (the message names the first one found)."""


def _coverage_disagrees(recorded: Optional[dict], measured: Optional[dict]) -> bool:
    """Whether a recorded coverage summary is not the one the stored log-probs give (same method only). Both
    sum the same chunks in the same order; the tolerance only allows for another numpy's summation order."""
    if not recorded or not measured or recorded.get("method") != measured["method"]:
        return False
    return (recorded.get("n_positions") != measured["n_positions"]
            or not abs(float(recorded.get("mean", -1.0)) - measured["mean"]) <= 1e-9)


def check_rows(group: zarr.Group, lo: int, hi: int, ids: np.ndarray, lp: np.ndarray, selection: dict,
               vocab: int) -> str:
    """The first broken invariant of store rows lo..hi of a complete store, or ''. `ids` / `lp` are those rows of
    topk_ids (as stored) and topk_logprobs (float32), read once by the caller. Every kind: real columns first
    (at least one), ids in range and distinct, log-probs finite, <= 0, decreasing, mass <= 1; padding columns
    id = the dtype's max and log-prob -inf. top-p: a row's top-j mass reaches p, or j = k. sampled: the counts
    of the real columns are >= 1 and sum to n, 0 at padding."""
    pad = lp == -np.inf
    real = ~pad
    if np.any(np.isnan(lp) | (lp == np.inf)):
        return "topk_logprobs hold NaN or +inf"
    if selection["kind"] == "top-k" and pad.any():
        return "a top-k store holds padding (-inf) columns"
    if not real[:, 0].all() or np.any(real[:, 1:] & pad[:, :-1]):
        return "padding columns are not all after the real ones"
    if np.any(ids[pad] != np.iinfo(ids.dtype).max):
        return "padding columns hold ids"
    if ids[real].size and int(ids[real].max()) >= vocab:
        return f"topk_ids hold an id >= vocab_size {vocab}"
    if np.any(lp[real] > 0):
        return "topk_logprobs hold log-probs > 0"
    with np.errstate(invalid="ignore"):  # -inf - -inf between padding columns
        if np.any((np.diff(lp, axis=1) > 0) & real[:, 1:]):
            return "topk_logprobs are not in decreasing order"
    ordered = np.sort(np.where(real, ids.astype(np.int64), -1 - np.arange(ids.shape[1])), axis=1)
    if np.any(ordered[:, 1:] == ordered[:, :-1]):
        return "a row repeats an id"
    mass = np.exp(lp.astype(np.float64)).sum(axis=1)
    if np.any(mass > 1 + MASS_TOLERANCE):
        return "top-k mass above 1"
    count = real.sum(axis=1)
    if "topk_count" in group and np.any(group["topk_count"][lo:hi].astype(np.int64) != count):
        return "topk_count disagrees with the padding"
    if selection["kind"] == "top-p" and np.any((mass < selection["p"] - MASS_TOLERANCE) & (count < ids.shape[1])):
        return f"a row stops before its mass reaches p = {selection['p']}"
    if selection["kind"] == "sampled":
        draws = group["sample_counts"][lo:hi].astype(np.int64)
        if np.any(draws[pad] != 0) or np.any(draws[real] < 1) or np.any(draws.sum(axis=1) != selection["n"]):
            return f"sample_counts are not >= 1 at the ids, 0 at padding, {selection['n']} per row"
    return ""


def verify(path) -> dict:
    """Check every invariant of a store, reading it chunk by chunk; return the summary dict.

    Raises DamagedStore (with the first problem found) when the store is inconsistent.
    """
    path = Path(path)
    store = open_store(path, require_complete=False, sampled_ok=True)
    group, attrs = store.group, store.attrs
    counts = attrs["counts"]
    n_seq, n_tok, n_pos, k = counts["n_sequences"], counts["n_tokens"], counts["n_positions"], attrs["k"]
    vocab = attrs["vocab_size"]
    complete = bool(attrs.get("complete"))
    selection = selection_of(attrs)

    def fail(msg):
        raise DamagedStore(msg)

    missing = _missing_chunks(group)
    if missing and complete:
        fail(missing)
    seq_off, pos_off = store._seq_offsets, store._pos_offsets
    if len(seq_off) != n_seq + 1 or seq_off[0] != 0 or seq_off[-1] != n_tok or np.any(np.diff(seq_off) < 1):
        fail("seq_offsets are not increasing from 0 to n_tokens")
    if len(pos_off) != n_seq + 1 or pos_off[0] != 0 or pos_off[-1] != n_pos or np.any(np.diff(pos_off) < 1):
        fail("pos_offsets are not increasing from 0 to n_positions (every sequence needs a target)")
    if group["topk_ids"].shape != (max(n_pos, 1), k) or group["topk_logprobs"].shape != (max(n_pos, 1), k):
        fail("top-k arrays do not have shape [n_positions, k]")
    wanted = {"top-k": (), "top-p": ("topk_count",), "sampled": ("topk_count", "sample_counts")}.get(selection["kind"])
    if wanted is None or any(name not in group for name in wanted):
        fail(f"selection {selection} is unknown or lacks its arrays")

    # Per-position sequence lengths, to check that every target position lies inside its sequence.
    lengths = np.diff(seq_off)
    seq_len_per_pos = np.repeat(lengths, np.diff(pos_off))
    chunk = group["topk_ids"].chunks[0]
    coverage = MassAccumulator()  # the top-k mass of every position, in bounded memory
    n_ids = 0  # real (non-padding) columns of every row
    try:
        for lo in range(0, n_tok, 1 << 20):
            ids = group["input_ids"][lo: lo + (1 << 20)]
            if ids.size and int(ids.max()) >= vocab:
                fail(f"input_ids hold an id >= vocab_size {vocab}")
        for lo in range(0, n_pos, chunk):
            hi = min(lo + chunk, n_pos)
            tp = group["target_positions"][lo:hi].astype(np.int64)
            if np.any(tp + 1 >= seq_len_per_pos[lo:hi]):
                fail(f"target_positions rows {lo}..{hi} point outside their sequences")
            if not complete:
                continue
            lp = group["topk_logprobs"][lo:hi].astype(np.float32)
            problem = check_rows(group, lo, hi, group["topk_ids"][lo:hi], lp, selection, vocab)
            if problem:
                fail(f"rows {lo}..{hi}: {problem}")
            coverage.add(lp)
            n_ids += int(np.isfinite(lp).sum())
    except DamagedStore:
        raise
    except Exception as e:  # checksum failures of torn chunks land here
        fail(f"{type(e).__name__}: {e}")

    measured = coverage.summary() if complete and n_pos else None
    recorded = attrs.get("coverage")
    if _coverage_disagrees(recorded, measured):
        fail(f"the recorded coverage (mean top-k mass {recorded.get('mean')} over {recorded.get('n_positions')} "
             f"positions) disagrees with the stored log-probs ({measured['mean']} over {measured['n_positions']})")
    disk = bytes_on_disk(path)
    topk_disk = sum(bytes_on_disk(path, name, chunks_only=True) for name in TOPK_ARRAYS if name in group)
    return {
        "path": str(path),
        "complete": complete,
        "format_version": attrs.get("format_version"),
        "n_sequences": n_seq,
        "n_tokens": n_tok,
        "n_positions": n_pos,
        "k": k,
        "selection": selection,
        "mean_ids_per_position": n_ids / n_pos if complete and n_pos else k,
        "vocab_size": vocab,
        "bytes_on_disk": disk,
        # the teacher payload per position (chunks of topk_ids, topk_logprobs and, where present, topk_count and
        # sample_counts: what caching costs per target); the total also counts the prompts (which dominate for
        # multiple-choice data with one target per sequence) and the metadata.
        "bytes_per_position": topk_disk / max(n_pos, 1),
        "bytes_per_position_total": disk / max(n_pos, 1),
        "mean_topk_mass": measured["mean"] if measured else None,
        "topk_mass_p10": measured["quantiles"]["p10"] if measured else None,
        # first_kd.coverage: the summary `cache` recorded, else the one measured here (stores written before
        # coverage was recorded); the probe curve of `cache --probe-k`, when one was run
        "coverage": recorded or measured,
        "coverage_recorded": bool(recorded),
        "coverage_probe": attrs.get("coverage_probe"),
        "temperature": dict(attrs.get("temperature") or {}),
        "temperature_pending": pending_fit_problem(path, attrs) or None,
        "teacher": attrs.get("teacher"),
        "data": attrs.get("data"),
        "max_length": attrs.get("max_length"),
        "units_done": int(attrs["n_units"]) - len(pending_units(group)),
        "n_units": int(attrs["n_units"]),
    }
