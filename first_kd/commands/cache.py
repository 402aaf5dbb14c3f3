"""The teacher pass (`first-kd cache`): run the teacher once, keep its top-k at target positions.

Work is split into units of `chunk_positions` store rows (see first_kd.store). Each process takes
every num_processes-th pending unit, has the engine (first_kd.engines) run the teacher on the sequences
that own the unit's rows, and writes the rows; a killed pass re-run with the same command redoes only
units not marked done. Because a unit's batches depend only on the unit, never on the process count or
on what ran before, a resumed or multi-process pass is array-equal to a single uninterrupted one.

The main process holds a lock on --out for the whole pass, so a rival pass stops at once; the same
command on a finished store is a no-op that never loads the teacher (see `pass_identity`), and the store
records a cheap fingerprint of the teacher's weights (first_kd.models.weights_fingerprint) so that
`calibrate` can tell teachers apart by what they are, not by the path they were loaded from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pyarrow.compute as pc
import torch
import zarr
from tqdm.auto import tqdm

from first_kd import __version__
from first_kd import coverage
from first_kd import store as topk_store
from first_kd.config import option
from first_kd.data import DataConfig, prepare_dataset
from first_kd.data.tokenize import data_fingerprint
from first_kd.engines.options import EngineOptions
from first_kd.errors import FirstKDError
from first_kd.models import (ModelOptions, load_config, load_model, load_tokenizer, model_positions, resolve_dtype,
                             weights_fingerprint)
from first_kd.outputs import crash_point, exclusive_lock, say_done, settings_diff


MAX_PROBE_K = 1024


@dataclasses.dataclass
class CacheConfig(ModelOptions, EngineOptions, DataConfig):
    teacher: Optional[str] = option(None, help="teacher causal LM: hub id or local path")
    out: Optional[str] = option(None, help="store path to write (a directory, e.g. cache/csqa-train.zarr)")
    k: int = option(5, help="top-k ids kept per target position")
    batch_size: int = option(8, help="sequences per teacher forward")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="teacher weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    chunk_positions: int = option(16384, help="store rows per chunk; also the unit of resume and of work splitting")
    overwrite: bool = option(False, help="replace an existing store at --out")
    probe_k: Optional[int] = option(
        None, help="also measure the teacher's top-j mass for j = 1..PROBE_K (> --k) on --probe-positions positions "
                   "and record the curve in the store, to choose k (`first-kd inspect` suggests one); the stored "
                   "top-k is unchanged; on a complete store it runs the probe alone; hf engine only")
    top_p: Optional[float] = option(
        None, help="variable k: keep, per position, the smallest set of most probable ids whose mass reaches TOP_P "
                   "(at most --k of them, so --k is the cap: e.g. --top-p 0.95 --k 64); stored ragged with counts")
    sample: Optional[int] = option(
        None, help="a sampled cache (RS-KD) instead of the top-k: SAMPLE draws per position (1..255) with "
                   "replacement from the teacher's softmax at temperature 1, distinct ids kept with their counts; "
                   "--k is not used; `distill` trains on it with the unbiased sampled loss; hf engine only")
    sample_seed: int = option(0, help="seed of --sample's draws (each unit draws from its own generator seeded "
                                      "by this and the unit, so a resumed pass draws what an uninterrupted one does)")
    probe_positions: int = option(2048, help="how many target positions --probe-k measures: whole sequences drawn "
                                             "in a fixed seeded order until they hold this many")

    def validate(self):
        super().validate()
        self.refuse_trace_spec("a store holds the teacher's top-k for fixed token sequences, computed once",
                               "cache fixed variants with --trace-levels (e.g. 0,0.5,1) instead, or train on the "
                               "data itself with `distill --data FILE --loss ce --trace-spec ...`")
        self.validate_engine()
        if not self.teacher:
            raise FirstKDError("missing --teacher (a hub id or a local model directory)")
        self.require_data()
        if not self.out:
            raise FirstKDError("missing --out (where to write the store, e.g. cache/train.zarr)")
        if self.k < 1:
            raise FirstKDError(f"--k must be >= 1, got {self.k}")
        if self.batch_size < 1 or self.chunk_positions < 1:
            raise FirstKDError("--batch-size and --chunk-positions must be >= 1")
        self.validate_probe()
        self.validate_selection()

    def validate_selection(self):
        if self.top_p is not None and self.sample is not None:
            raise FirstKDError("--top-p and --sample are two kinds of cache: choose one")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise FirstKDError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.sample is not None:
            if not 1 <= self.sample <= topk_store.MAX_SAMPLE_DRAWS:
                raise FirstKDError(f"--sample must be 1..{topk_store.MAX_SAMPLE_DRAWS} draws per position (counts "
                                   f"are stored as uint8), got {self.sample}")
            if self.engine == "vllm":
                raise FirstKDError("--sample runs on the hf engine only (vLLM returns ranked log-probs, not draws "
                                   "from the full softmax): use --engine hf, or --top-p on vLLM")

    def selection(self) -> dict:
        """The store's `selection` record (first_kd.store) for these options."""
        if self.sample is not None:
            return {"kind": "sampled", "n": self.sample, "k": self.sample, "proposal": "teacher",
                    "proposal_temperature": 1.0, "seed": self.sample_seed}
        if self.top_p is not None:
            return {"kind": "top-p", "p": self.top_p, "k": self.k}
        return {"kind": "top-k", "k": self.k}

    @property
    def width(self) -> int:
        """Columns per store row: --sample's draws, else --k."""
        return self.sample if self.sample is not None else self.k

    def validate_probe(self):
        if self.probe_k is None:
            return
        if self.engine == "vllm":
            raise FirstKDError("--probe-k runs on the hf engine only: probe a sample with `first-kd cache --engine hf "
                               "--limit 500 --probe-k K --out probe.zarr` and `first-kd inspect probe.zarr`, then "
                               "cache with --engine vllm and the k it suggests")
        if not self.width < self.probe_k <= MAX_PROBE_K:
            raise FirstKDError(f"--probe-k must be larger than the store's width ({self.width}: --k, or --sample's "
                               f"draws) and at most {MAX_PROBE_K} (its curve "
                               f"is kept in the store's attributes), got {self.probe_k}")
        if self.probe_positions < 1:
            raise FirstKDError(f"--probe-positions must be >= 1, got {self.probe_positions}")


# ----------------------------------------------------------------------------------------------
# Planning, and what makes two passes the same pass
# ----------------------------------------------------------------------------------------------


def _plan_attrs(cfg: CacheConfig, tokenizer, dtype, info: dict, fingerprint: str, weights: Optional[dict],
                engine: dict) -> dict:
    return {
        "teacher": {"name": cfg.teacher, "revision": cfg.revision, "dtype": str(dtype).replace("torch.", ""),
                    "model_type": None, "weights": weights, "engine": engine},
        "tokenizer": topk_store.tokenizer_fingerprint(tokenizer),
        "data": {"source": cfg.data, "split": cfg.split, "format": info["format"], "fingerprint": fingerprint,
                 "n_truncated": info.get("n_truncated", 0), "choice_token_ids": info.get("choice_token_ids", []),
                 "choice_labels": info.get("choice_labels", []), "template": cfg.template,
                 "chat_template": cfg.chat_template, "trace_levels": info.get("trace_levels")},
        "max_length": cfg.max_length,
        "k": cfg.width,
        "selection": cfg.selection(),
        "chunk_positions": cfg.chunk_positions,
        "created_by": f"first-kd {__version__}",
    }


def _short(digest: Optional[str]) -> Optional[str]:
    return digest[:16] if isinstance(digest, str) else digest


def pass_identity(attrs: dict) -> dict:
    """The settings that make two passes the same pass (a resume continues one; a re-run of a finished one
    is a no-op), flattened from store attributes. Batch size and process count are not among them: they
    never change the arrays. The engine is: vLLM's version and parallel layout change the arithmetic
    (stores written before engines were recorded are hf stores)."""
    teacher = attrs.get("teacher") or {}
    engine = teacher.get("engine") or {"name": "hf"}
    layout = {key: value for key, value in (engine.get("settings") or {}).items()
              if key in ("tensor_parallel_size", "pipeline_parallel_size")}
    return {"teacher": teacher.get("name"), "revision": teacher.get("revision"), "dtype": teacher.get("dtype"),
            "engine": engine.get("name"), "engine_version": engine.get("version"), "engine_layout": layout or None,
            "weights": _short((teacher.get("weights") or {}).get("sha256")),
            "tokenizer": _short((attrs.get("tokenizer") or {}).get("sha256")),
            "data": _short((attrs.get("data") or {}).get("fingerprint")),
            "max_length": attrs.get("max_length"), "k": attrs.get("k"), "chunk_positions": attrs.get("chunk_positions"),
            "selection": topk_store.describe_selection(topk_store.selection_of(attrs)) if attrs.get("k") else None}


def pass_differences(old_attrs: dict, new_attrs: dict) -> str:
    """'' when two passes are the same pass, else the differences (`key: old -> new`).

    The weights' fingerprint decides who the teacher is when both sides have one (then the name it was
    loaded by does not matter); otherwise the name and revision do."""
    old, new = pass_identity(old_attrs), pass_identity(new_attrs)
    keys = list(new)
    drop = ("teacher", "revision") if old["weights"] and new["weights"] else ("weights",)
    return settings_diff(old, new, [key for key in keys if key not in drop])


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out holding someone else's files, before anything is read."""
    if overwrite or not out.exists() or topk_store.is_store(out):
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise FirstKDError(f"{out} exists and is not a first-kd store: choose another --out")


@dataclasses.dataclass
class _Inputs:
    """What the main process knows before loading the teacher: the tokenized data and the planned settings."""

    tokenized: object
    info: dict
    attrs: dict


def _prepare(cfg: CacheConfig, tokenizer, dtype, engine: dict) -> Optional[_Inputs]:
    """Check --out, tokenize and fingerprint the data and the weights (main process, lock held).

    None when --out already holds a complete store of this very pass: the re-run is a no-op and the
    teacher is never loaded. Tokenizing is needed to know that (the data file may have changed); it
    costs little next to the teacher pass."""
    out = Path(cfg.out)
    _check_out(out, cfg.overwrite)
    tokenized, info = prepare_dataset(cfg, tokenizer)
    attrs = _plan_attrs(cfg, tokenizer, dtype, info, data_fingerprint(tokenized),
                        weights_fingerprint(cfg.teacher, cfg.revision), engine)
    if not cfg.overwrite and topk_store.is_store(out):
        old = dict(zarr.open_group(str(out), mode="r").attrs)
        if old.get("complete"):
            diff = pass_differences(old, attrs)
            if diff:
                raise FirstKDError(f"store {out} is already complete, made with other settings ({diff}): pass "
                                   "--overwrite to replace it (or choose another --out)")
            return None
    if info.get("n_truncated"):
        print(f"first-kd cache: note: {info['n_truncated']} record(s) had their target cut to fit "
              f"--max-length {cfg.max_length} (raise it to keep them whole)")
    return _Inputs(tokenized, info, attrs)


def _plan(cfg: CacheConfig, inputs: _Inputs, model_config, vocab_size: int) -> None:
    """Write the store's planning arrays, or check that an unfinished store can be resumed."""
    out = Path(cfg.out)
    _check_probe_k(cfg, vocab_size)
    attrs = inputs.attrs
    attrs["teacher"]["model_type"] = getattr(model_config, "model_type", None)
    if attrs["teacher"]["weights"] is None:  # a hub teacher downloaded by loading it: its files are in reach now
        attrs["teacher"]["weights"] = weights_fingerprint(cfg.teacher, cfg.revision)
    if out.exists() and not cfg.overwrite and topk_store.is_store(out):
        old = dict(zarr.open_group(str(out), mode="r").attrs)
        if old.get("stage") == "planned":
            diff = pass_differences(old, attrs)
            if diff:
                raise FirstKDError(f"store {out} holds an unfinished pass with other settings ({diff}): "
                                   "re-run with the original settings to resume, or pass --overwrite")
            topk_store.clear_partials(out)  # staging files of writes cut by the kill
            print(f"first-kd cache: resuming unfinished store {out}")
            return
        # planning itself was interrupted: nothing of value was written, start over
    tokenized = inputs.tokenized
    # Counted from the Arrow columns: never the token lists as Python objects.
    lengths = pc.list_value_length(tokenized.data.column("input_ids")).to_numpy().astype(np.int64)
    n_positions = int((lengths - tokenized.data.column("target_start").to_numpy().astype(np.int64)).sum())
    plan = topk_store.Plan(n_sequences=len(tokenized), n_tokens=int(lengths.sum()), n_positions=n_positions,
                           k=cfg.width, chunk_positions=cfg.chunk_positions, selection=cfg.selection())
    if cfg.sample is None and cfg.k > vocab_size:
        raise FirstKDError(f"--k {cfg.k} is larger than the teacher's vocabulary ({vocab_size})")
    topk_store.remove_store(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    topk_store.create_store(out, tokenized, plan, attrs, vocab_size)


def _check_probe_k(cfg: CacheConfig, vocab_size: int) -> None:
    if cfg.probe_k is not None and cfg.probe_k > vocab_size:
        raise FirstKDError(f"--probe-k {cfg.probe_k} is larger than the teacher's vocabulary ({vocab_size})")


def _engine(cfg: CacheConfig, dtype) -> tuple[dict, Optional[dict]]:
    """(what the store records about the engine, vllm.LLM's settings or None for hf). Nothing is loaded."""
    if cfg.engine == "hf":
        import transformers

        return {"name": "hf", "transformers": transformers.__version__, "device_map": cfg.device_map}, None
    from first_kd.engines import vllm as vllm_engine

    # A sequence is at most --max-length tokens; the engine reads it up to its last target (one token
    # short of the end) plus one generated step.
    positions = model_positions(load_config(cfg.teacher, cfg.revision, cfg.trust_remote_code))
    max_len = cfg.max_length if positions is None else min(cfg.max_length, positions)
    settings = vllm_engine.engine_settings(cfg, cfg.teacher, cfg.revision, cfg.trust_remote_code,
                                           str(dtype).replace("torch.", ""), max_len, cfg.width)
    return vllm_engine.engine_record(settings), settings


@dataclasses.dataclass
class _Teacher:
    """A loaded teacher, whatever the engine: its config, vocabulary size and `topk(sequences, positions,
    on_batch, k) -> (ids, logprobs)` for one unit (first_kd.engines' contract); the hf engine's also takes
    draw_seed=S for a sampled unit, returning (ids, logprobs, counts)."""

    config: object
    vocab_size: int
    topk: object


@contextlib.contextmanager
def _open_teacher(cfg: CacheConfig, state, dtype, pad_id: int, settings: Optional[dict]):
    """The teacher on the hf engine, or on vLLM with `settings` (from `_engine`)."""
    if settings is not None:
        from first_kd.engines import vllm as vllm_engine

        config = load_config(cfg.teacher, cfg.revision, cfg.trust_remote_code)
        with vllm_engine.started_engine(settings) as llm:
            yield _Teacher(config, config.vocab_size,
                           lambda seqs, pos, on_batch, k: vllm_engine.unit_topk(llm, seqs, pos, k, on_batch))
        return
    from first_kd.engines.hf import unit_topk

    model = load_model(cfg.teacher, dtype, state.device, cfg.revision, cfg.trust_remote_code, cfg.device_map)
    device = None if cfg.device_map != "none" else state.device  # spread: inputs go where the embeddings are
    yield _Teacher(model.config, model.get_output_embeddings().weight.shape[0],
                   lambda seqs, pos, on_batch, k, draw_seed=None: unit_topk(
                       model, seqs, pos, k, cfg.batch_size, pad_id, device=device, on_batch=on_batch,
                       draw_seed=draw_seed))


def _main_then_share(state, fn):
    """Run `fn` on the main process only. Every process stops with its error, and learns whether it
    returned None (then the others get None too, else True)."""
    result, error = None, None
    if state.is_main_process:
        try:
            result = fn()
        except (FirstKDError, OSError) as e:
            if state.num_processes == 1:
                raise
            error = e
    if state.num_processes == 1:
        return result
    import torch.distributed as dist

    message = str(error) if error else None  # the main process reports an OSError itself, in full
    payload = [message, result is None]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[0]:
        raise FirstKDError(payload[0])
    return result if state.is_main_process else (None if payload[1] else True)


def run_cache(cfg: CacheConfig) -> int:
    from accelerate import PartialState

    # cpu=True lets a CPU-only launch of several processes use gloo instead of looking for GPUs.
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1 and (cfg.engine == "vllm" or cfg.device_map != "none"):
        raise FirstKDError(f"--{'engine vllm' if cfg.engine == 'vllm' else 'device-map auto'} spreads the teacher "
                           "over the GPUs itself: run `first-kd cache` as one process (not under accelerate launch)")
    dtype = resolve_dtype(cfg.dtype, state.device)
    tokenizer = load_tokenizer(cfg.teacher, cfg.revision, cfg.trust_remote_code)
    engine, settings = _engine(cfg, dtype)  # once: the store's record of it, and vLLM's settings
    with contextlib.ExitStack() as held:
        # Only the main process of a launch takes the lock (its other processes are its helpers, not
        # rivals) and plans; the others wait and then read the plan from the store, so every process
        # sees the same sequences.
        def lock_and_prepare():
            held.enter_context(exclusive_lock(Path(cfg.out), "cache"))
            return _prepare(cfg, tokenizer, dtype, engine)

        inputs = _main_then_share(state, lock_and_prepare)
        if inputs is None:
            if not state.is_main_process:
                return 0
            if not _probe_wanted(cfg, dict(zarr.open_group(cfg.out, mode="r").attrs)):
                return say_done("cache", cfg.out, "a complete top-k store")
            teacher = held.enter_context(_open_teacher(cfg, state, dtype, tokenizer.pad_token_id, settings))
            _probe_complete_store(cfg, teacher)
            return 0
        teacher = held.enter_context(_open_teacher(cfg, state, dtype, tokenizer.pad_token_id, settings))
        try:
            _main_then_share(state, lambda: _plan(cfg, inputs, teacher.config, teacher.vocab_size))
            crash_point("planned")
            group = zarr.open_group(cfg.out, mode="r+")
            _run_units(cfg, state, teacher, group)
            _finish(cfg, state, group, teacher)
        except OSError as e:  # a full disk: zarr's failed chunk writes name no file, so name the store
            if not e.filename:
                e.filename = str(cfg.out)
            raise
    return 0


def _run_units(cfg: CacheConfig, state, teacher: _Teacher, group) -> None:
    """This process's share of the pending units: the engine's top-k at their rows, written unit by unit."""
    seq_offsets = group["seq_offsets"][:]
    pos_offsets = group["pos_offsets"][:]
    pending = topk_store.pending_units(group)
    if state.num_processes > 1:
        # Every process must split the same list: none may mark a unit done before all have read it.
        state.wait_for_everyone()
    mine = pending[state.process_index:: state.num_processes]
    total_rows = sum(np.subtract(*topk_store.unit_rows(group, u)[::-1]) for u in mine)
    bar = tqdm(total=int(total_rows), unit="pos", desc=f"teacher {topk_store.describe_selection(cfg.selection())}",
               disable=not state.is_local_main_process, dynamic_ncols=True)
    tokens_seen, started = 0, time.perf_counter()

    def progress(n_rows: int, n_tokens: int) -> None:
        nonlocal tokens_seen
        tokens_seen += n_tokens
        bar.update(n_rows)
        bar.set_postfix(tok_s=f"{tokens_seen / (time.perf_counter() - started):,.0f}")

    for unit in mine:
        sequences, positions = topk_store.unit_sequences(group, unit, seq_offsets, pos_offsets)
        rows = _selected_rows(cfg, teacher, unit, sequences, positions, progress)
        crash_point(f"unit-computed:{unit}")
        topk_store.write_unit(group, unit, rows[0], rows[1], crash_hook=crash_point,
                              sample_counts=rows[2] if len(rows) > 2 else None)
        crash_point(f"unit-done:{unit}")
    bar.close()


def _selected_rows(cfg: CacheConfig, teacher: _Teacher, unit: int, sequences, positions, progress) -> tuple:
    """One unit's rows as the store's selection wants them: (ids, logprobs) with -inf at padding, and the
    counts of a sampled unit. A top-p row is cut from the engine's fp32 top-k (first_kd.coverage.top_p_counts),
    so it works on every engine; draws come from a generator seeded by (--sample-seed, unit)."""
    if cfg.sample is not None:
        seed = int(np.random.SeedSequence([cfg.sample_seed, unit]).generate_state(1)[0])
        return teacher.topk(sequences, positions, progress, cfg.sample, draw_seed=seed)
    ids, logprobs = teacher.topk(sequences, positions, progress, cfg.k)
    if cfg.top_p is not None:
        keep = coverage.top_p_counts(logprobs, cfg.top_p)
        logprobs = np.where(np.arange(cfg.k)[None, :] < keep[:, None], logprobs, -np.inf).astype(np.float32)
    return ids, logprobs


def _finish(cfg: CacheConfig, state, group, teacher: _Teacher) -> None:
    """Mark the store complete once every unit of every process is on disk, and verify it. The same replace of
    the attributes records the coverage summary (computed from the stored log-probs, so a resumed pass records
    what an uninterrupted one does) and the --probe-k curve."""
    if state.num_processes > 1:
        state.wait_for_everyone()
    if state.is_main_process:
        crash_point("before-complete")
        still = topk_store.pending_units(group)
        if still:
            raise FirstKDError(f"{len(still)} unit(s) of {cfg.out} were not written (a process failed?): re-run "
                               "the same command to finish them")
        extra = {"finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "max_token_id": topk_store.max_token_id(group), "coverage": topk_store.coverage_summary(group)}
        if cfg.probe_k is not None:
            extra["coverage_probe"] = _probe(cfg, teacher, group)
        topk_store.mark_complete(group, extra)
        summary = topk_store.verify(cfg.out)
        print(f"first-kd cache: wrote {cfg.out}: {summary['n_sequences']:,} sequences, "
              f"{summary['n_positions']:,} target positions, {summary['bytes_per_position']:.2f} bytes/position, "
              f"mean {topk_store.describe_selection(cfg.selection())} mass {summary['mean_topk_mass']:.4f} (p10 "
              f"{summary['topk_mass_p10']:.4f}), {summary['mean_ids_per_position']:.2f} ids/position")
        if cfg.probe_k is not None:
            _say_probe(cfg, extra["coverage_probe"])
    if state.num_processes > 1:
        state.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# The probe of --probe-k: the teacher's top-j mass for j = 1..K on a sample of positions
# ----------------------------------------------------------------------------------------------


def _probe_settings(cfg: CacheConfig) -> dict:
    """What makes two probes the same probe (a re-run with them on a complete store is a no-op)."""
    return {"k": cfg.probe_k, "positions": cfg.probe_positions, "seed": coverage.PROBE_SEED}


def _probe_wanted(cfg: CacheConfig, attrs: dict) -> bool:
    """Whether --probe-k asks for a probe the store does not hold yet."""
    if cfg.probe_k is None:
        return False
    held = attrs.get("coverage_probe") or {}
    return {key: held.get(key) for key in ("k", "positions", "seed")} != _probe_settings(cfg)


def _probe(cfg: CacheConfig, teacher: _Teacher, group) -> dict:
    """The `coverage_probe` record: the engine's top-PROBE_K at the positions of first_kd.coverage.probe_sequences,
    as first_kd.coverage.mass_curve summarises them (fp32 log-probs from the engine, never written to the arrays)."""
    seq_offsets, pos_offsets = group["seq_offsets"][:], group["pos_offsets"][:]
    chosen, take = coverage.probe_sequences(np.diff(pos_offsets), cfg.probe_positions)
    sequences, positions = topk_store.read_sequences(group, chosen, seq_offsets, pos_offsets)
    positions = [p[:n] for p, n in zip(positions, take)]
    print(f"first-kd cache: probing the teacher's top-{cfg.probe_k} mass on {int(take.sum()):,} positions "
          f"({len(chosen):,} sequences)")
    _, logprobs = teacher.topk(sequences, positions, None, cfg.probe_k)
    return {**_probe_settings(cfg), **coverage.mass_curve(logprobs), "n_sequences": int(len(chosen)),
            "source": "the engine's fp32 log-softmax (not stored)"}


def _say_probe(cfg: CacheConfig, probe: dict) -> None:
    target = coverage.DEFAULT_TARGET
    hint = coverage.suggest_k(probe, target)

    def at(key):
        return f"k={hint[key]}" if hint[key] else f"more than {probe['k']}"

    print(f"first-kd cache: probe: mean top-j mass reaches {target} at {at('k_mean')}, its p10 at {at('k_p10')} "
          f"(`first-kd inspect {cfg.out}` for the curve; --coverage for another target)")


def _probe_complete_store(cfg: CacheConfig, teacher: _Teacher) -> None:
    """--probe-k on a store this very pass already completed: run the probe alone and record it (the arrays
    are not touched). A store written before coverage was recorded gets its `coverage` summary too."""
    _check_probe_k(cfg, teacher.vocab_size)
    group = zarr.open_group(cfg.out, mode="r")
    changes = {"coverage_probe": _probe(cfg, teacher, group)}
    if "coverage" not in group.attrs:
        changes["coverage"] = topk_store.coverage_summary(group)
    topk_store.update_attrs(Path(cfg.out), changes)
    _say_probe(cfg, changes["coverage_probe"])
