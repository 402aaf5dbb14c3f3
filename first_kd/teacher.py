"""The teacher pass (`first-kd cache`): run the teacher once, keep its top-k at target positions.

Work is split into units of `chunk_positions` store rows (see first_kd.store). Each process takes
every num_processes-th pending unit, runs the teacher on the sequences that own the unit's rows and
writes the rows; a killed pass re-run with the same command redoes only units not marked done. Because
a unit's batches depend only on the unit, never on the process count or on what ran before, a resumed
or multi-process pass is array-equal to a single uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pyarrow.compute as pc
import torch
import zarr
from tqdm.auto import tqdm

from first_kd import __version__
from first_kd import store as topk_store
from first_kd.config import option
from first_kd.data import DataConfig, prepare_dataset
from first_kd.errors import FirstKDError
from first_kd.models import head_logits, last_hidden_states, load_model, load_tokenizer, resolve_dtype


@dataclasses.dataclass
class CacheConfig(DataConfig):
    teacher: Optional[str] = option(None, help="teacher causal LM: hub id or local path")
    out: Optional[str] = option(None, help="store path to write (a directory, e.g. cache/csqa-train.zarr)")
    revision: Optional[str] = option(None, help="teacher revision (branch, tag or commit) when loading from a hub")
    k: int = option(5, help="top-k ids kept per target position")
    batch_size: int = option(8, help="sequences per teacher forward")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="teacher weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    chunk_positions: int = option(16384, help="store rows per chunk; also the unit of resume and of work splitting")
    overwrite: bool = option(False, help="replace an existing store at --out")
    trust_remote_code: bool = option(False, help="allow model code from the hub (only for teachers you trust)")

    def validate(self):
        super().validate()
        if not self.teacher:
            raise FirstKDError("missing --teacher (a hub id or a local model directory)")
        if not self.data:
            raise FirstKDError("missing --data (a jsonl/json/parquet/csv file, a save_to_disk dir or a hub dataset)")
        if not self.out:
            raise FirstKDError("missing --out (where to write the store, e.g. cache/train.zarr)")
        if self.k < 1:
            raise FirstKDError(f"--k must be >= 1, got {self.k}")
        if self.batch_size < 1 or self.chunk_positions < 1:
            raise FirstKDError("--batch-size and --chunk-positions must be >= 1")


def _crash_point(name: str) -> None:
    """Testing hook: FIRST_KD_CRASH_AT=name makes the process SIGKILL itself here, so tests can kill a
    pass at exact points (after planning, between a unit's rows and its done-marker, ...)."""
    if os.environ.get("FIRST_KD_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def topk_at_positions(model, input_ids, attention_mask, rows, cols, k: int, head_chunk: int = 4096):
    """Top-k of the full-vocabulary log-softmax at selected positions only.

    Args:
        input_ids, attention_mask: [B, S] (right-padded).
        rows, cols: [N] batch row and sequence position of each wanted position.
    Returns:
        (ids [N, k] int64, logprobs [N, k] float32), ids by decreasing probability.

    Runs the transformer body once, then the output head on the N wanted hidden states only, in
    chunks: a [B, S, V] logits tensor is never built, which is why the pass costs no more than a
    plain forward.
    """
    picked = last_hidden_states(model, input_ids, attention_mask)[rows, cols]
    out_ids, out_lp = [], []
    for lo in range(0, picked.shape[0], head_chunk):
        logits = head_logits(model, picked[lo: lo + head_chunk])
        logprobs = torch.log_softmax(logits, dim=-1)
        values, ids = torch.topk(logprobs, k, dim=-1)
        out_ids.append(ids)
        out_lp.append(values)
    return torch.cat(out_ids), torch.cat(out_lp)


def data_fingerprint(tokenized) -> str:
    """sha256 of exactly what the teacher will see and where its targets are."""
    h = hashlib.sha256()
    table = tokenized.data
    for name in ("id", "input_ids", "target_start"):
        col = table.column(name).combine_chunks()
        for buf in col.buffers():
            if buf is not None:
                h.update(memoryview(buf))
    return h.hexdigest()


def _plan_attrs(cfg: CacheConfig, tokenizer, model_config, dtype, info: dict, fingerprint: str) -> dict:
    return {
        "teacher": {"name": cfg.teacher, "revision": cfg.revision, "dtype": str(dtype).replace("torch.", ""),
                    "model_type": getattr(model_config, "model_type", None)},
        "tokenizer": topk_store.tokenizer_fingerprint(tokenizer),
        "data": {"source": cfg.data, "split": cfg.split, "format": info["format"], "fingerprint": fingerprint,
                 "n_truncated": info.get("n_truncated", 0), "choice_token_ids": info.get("choice_token_ids", []),
                 "choice_labels": info.get("choice_labels", []), "template": cfg.template,
                 "chat_template": cfg.chat_template, "trace_levels": info.get("trace_levels")},
        "max_length": cfg.max_length,
        "created_by": f"first-kd {__version__}",
    }


# Settings that must be identical for a resume to continue an earlier pass.
_RESUME_KEYS = (("teacher", "name"), ("teacher", "revision"), ("teacher", "dtype"), ("tokenizer", "sha256"),
                ("data", "fingerprint"), ("max_length",), ("k",), ("chunk_positions",))


def _mismatch(old: dict, new: dict) -> Optional[str]:
    for key in _RESUME_KEYS:
        a, b = old, new
        for part in key:
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if a != b:
            return f"{'.'.join(key)} was {a!r}, now {b!r}"
    return None


def _plan(cfg: CacheConfig, tokenizer, model_config, dtype, vocab_size: int) -> None:
    """Tokenize and write the store's planning arrays, or check an unfinished store can be resumed."""
    out = Path(cfg.out)
    tokenized, info = prepare_dataset(cfg, tokenizer)
    if info.get("n_truncated"):
        print(f"first-kd cache: note: {info['n_truncated']} record(s) had their target cut to fit "
              f"--max-length {cfg.max_length} (raise it to keep them whole)")
    fingerprint = data_fingerprint(tokenized)
    attrs = _plan_attrs(cfg, tokenizer, model_config, dtype, info, fingerprint)
    attrs.update(k=cfg.k, chunk_positions=cfg.chunk_positions)
    if out.exists() and not cfg.overwrite and topk_store.is_store(out):
        old = dict(zarr.open_group(str(out), mode="r").attrs)
        if old.get("stage") == "planned":
            why = _mismatch(old, attrs)
            if why:
                raise FirstKDError(f"store {out} holds an unfinished pass with other settings ({why}): "
                                   "re-run with the original settings to resume, or pass --overwrite")
            print(f"first-kd cache: resuming unfinished store {out}")
            return
        # planning itself was interrupted: nothing of value was written, start over
    topk_store.remove_store(out)
    # Counted from the Arrow columns: never the token lists as Python objects.
    lengths = pc.list_value_length(tokenized.data.column("input_ids")).to_numpy().astype(np.int64)
    n_positions = int((lengths - tokenized.data.column("target_start").to_numpy().astype(np.int64)).sum())
    plan = topk_store.Plan(n_sequences=len(tokenized), n_tokens=int(lengths.sum()), n_positions=n_positions,
                           k=cfg.k, chunk_positions=cfg.chunk_positions)
    if cfg.k > vocab_size:
        raise FirstKDError(f"--k {cfg.k} is larger than the teacher's vocabulary ({vocab_size})")
    out.parent.mkdir(parents=True, exist_ok=True)
    topk_store.create_store(out, tokenized, plan, attrs, vocab_size)


def _unit_batches(group, unit: int, seq_offsets, pos_offsets, batch_size: int):
    """Sequences owning rows of `unit`, grouped into batches of similar length.

    Yields (sequence indices, row range [lo, hi) of each sequence clipped to the unit).
    """
    lo, hi = topk_store.unit_rows(group, unit)
    first = int(np.searchsorted(pos_offsets, lo, side="right")) - 1
    last = int(np.searchsorted(pos_offsets, hi, side="left"))
    seqs = np.arange(first, last)
    lengths = seq_offsets[seqs + 1] - seq_offsets[seqs]
    # Longest first, so padding within a batch is small; stable sort keeps the order deterministic.
    order = seqs[np.argsort(-lengths, kind="stable")]
    for b in range(0, len(order), batch_size):
        yield order[b: b + batch_size]


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out holding a finished store or someone else's files, before loading the teacher."""
    if overwrite or not out.exists():
        return
    if not topk_store.is_store(out):
        if out.is_dir() and not any(out.iterdir()):
            return
        raise FirstKDError(f"{out} exists and is not a first-kd store: choose another --out")
    if zarr.open_group(str(out), mode="r").attrs.get("complete"):
        raise FirstKDError(f"store {out} is already complete: pass --overwrite to replace it "
                           "(or choose another --out)")


def run_cache(cfg: CacheConfig) -> int:
    from accelerate import PartialState

    # cpu=True lets a CPU-only launch of several processes use gloo instead of looking for GPUs.
    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device
    _check_out(Path(cfg.out), cfg.overwrite)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.teacher, cfg.revision, cfg.trust_remote_code)
    model = load_model(cfg.teacher, dtype, device, cfg.revision, cfg.trust_remote_code)
    vocab_size = model.get_output_embeddings().weight.shape[0]

    # Only the main process plans; the others wait and then read the plan from the store, so every
    # process sees the same sequences.
    error = None
    if state.is_main_process:
        try:
            _plan(cfg, tokenizer, model.config, dtype, vocab_size)
        except FirstKDError as e:
            error = e
    if state.num_processes > 1:
        error = _broadcast_error(error)
    if error:
        raise error
    _crash_point("planned")

    group = zarr.open_group(cfg.out, mode="r+")
    seq_offsets = group["seq_offsets"][:]
    pos_offsets = group["pos_offsets"][:]
    input_ids_arr = group["input_ids"]
    target_positions_arr = group["target_positions"]
    pending = topk_store.pending_units(group)
    mine = pending[state.process_index:: state.num_processes]
    total_rows = sum(np.subtract(*topk_store.unit_rows(group, u)[::-1]) for u in mine)
    bar = tqdm(total=int(total_rows), unit="pos", desc=f"teacher top-{cfg.k}", disable=not state.is_local_main_process,
               dynamic_ncols=True)
    tokens_seen, started = 0, time.perf_counter()
    pad_id = tokenizer.pad_token_id
    with torch.inference_mode():
        for unit in mine:
            lo, hi = topk_store.unit_rows(group, unit)
            unit_ids = np.zeros((hi - lo, cfg.k), dtype=np.int64)
            unit_lp = np.zeros((hi - lo, cfg.k), dtype=np.float32)
            for batch in _unit_batches(group, unit, seq_offsets, pos_offsets, cfg.batch_size):
                seqs = [input_ids_arr[seq_offsets[i]: seq_offsets[i + 1]].astype(np.int64) for i in batch]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                rows, cols, dest = [], [], []
                for r, (i, s) in enumerate(zip(batch, seqs)):
                    ids[r, : len(s)] = torch.from_numpy(s)
                    mask[r, : len(s)] = 1
                    p0, p1 = int(pos_offsets[i]), int(pos_offsets[i + 1])
                    a, b = max(p0, lo), min(p1, hi)  # this unit's share of the sequence's rows
                    positions = target_positions_arr[a:b].astype(np.int64)
                    rows.append(np.full(b - a, r))
                    cols.append(positions)
                    dest.append(np.arange(a - lo, b - lo))
                rows_t = torch.from_numpy(np.concatenate(rows)).to(device)
                cols_t = torch.from_numpy(np.concatenate(cols)).to(device)
                top_ids, top_lp = topk_at_positions(model, ids.to(device), mask.to(device), rows_t, cols_t, cfg.k)
                where = np.concatenate(dest)
                unit_ids[where] = top_ids.cpu().numpy()
                unit_lp[where] = top_lp.cpu().numpy()
                tokens_seen += int(mask.sum())
                bar.update(len(where))
                bar.set_postfix(tok_s=f"{tokens_seen / (time.perf_counter() - started):,.0f}")
            _crash_point(f"unit-computed:{unit}")
            topk_store.write_unit(group, unit, unit_ids, unit_lp, crash_hook=_crash_point)
            _crash_point(f"unit-done:{unit}")
    bar.close()

    if state.num_processes > 1:
        state.wait_for_everyone()
    if state.is_main_process:
        _crash_point("before-complete")
        still = topk_store.pending_units(group)
        if still:
            raise FirstKDError(f"{len(still)} unit(s) of {cfg.out} were not written (a process failed?): re-run "
                               "the same command to finish them")
        topk_store.mark_complete(group, {"finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                         "max_token_id": _max_token_id(group)})
        summary = topk_store.verify(cfg.out)
        print(f"first-kd cache: wrote {cfg.out}: {summary['n_sequences']:,} sequences, "
              f"{summary['n_positions']:,} target positions, {summary['bytes_per_position']:.2f} bytes/position, "
              f"mean top-{cfg.k} mass {summary['mean_topk_mass']:.4f}")
    if state.num_processes > 1:
        state.wait_for_everyone()
    return 0


def _max_token_id(group) -> int:
    """Largest id a student must be able to output (cached top-k ids and target tokens)."""
    top = 0
    for name in ("input_ids", "topk_ids"):
        arr = group[name]
        step = arr.chunks[0]
        for lo in range(0, arr.shape[0], step):
            top = max(top, int(arr[lo: lo + step].max()))
    return top


def _broadcast_error(error: Optional[FirstKDError]) -> Optional[FirstKDError]:
    """Share the main process's planning error (if any) so every process stops with the same message."""
    import torch.distributed as dist

    payload = [str(error) if error else None]
    dist.broadcast_object_list(payload, src=0)
    return FirstKDError(payload[0]) if payload[0] else None
