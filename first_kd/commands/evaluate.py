"""`first-kd evaluate`: accuracy and calibration of a model, or of a teacher from its cached top-k.

What is scored
--------------
Multiple-choice data ("answer" level), one prediction per question at the answer position:
  * model: the logits of the option letters (" A", " B", ... up to the item's number of options)
    renormalised over those options; prediction = argmax, confidence = its renormalised probability.
    The full-vocabulary probability of the predicted letter and the vocabulary mass on all options are
    kept per example (a model can be confident among the letters while putting little mass on them).
  * store (`--store`): the teacher's top-k distribution (after the recorded temperature unless
    `--no-temperature`) with every option absent from the top-k given probability 0, then
    renormalised over the options. If no option is in the top-k the confidence is uniform over the
    options (prediction: the first, "A"), which is what "no information" means here.
Prompt/response data ("token" level), every target position:
  * model: the full-vocabulary distribution; confidence = top-1 probability, correct = top-1 is the
    next target token. Brier and NLL are over the full vocabulary.
  * store: the top-k distribution (renormalised over the k ids, after temperature); confidence = its
    top-1 probability, correct = the top-1 cached id is the target. A target outside the top-k has
    probability 0 (Brier counts it so).

NLL from a store: a gold answer / target with probability 0 under the top-k distribution has no
finite log-likelihood, so store NLLs average over the examples whose gold has probability > 0
(metrics.json: "nll_scope" = "gold probability > 0", "nll_n" = how many); for models "nll_scope" = "all".
For the logit temperature form this is the exact conditional likelihood (see first_kd.calibration).

Outputs in --out: metrics.json (written last: its presence means the run finished), predictions.jsonl
(one line per example) and reliability.png. They are written into a directory beside --out and swapped in
only when complete, so a failure (bad input, full disk, kill) leaves a previous evaluation as it was.

Re-running: metrics.json records the settings that made it ("settings": the options that change what is
measured, and a fingerprint of the model, data or store). The same command on a finished evaluation is a
no-op (exit 0); other settings, or inputs that changed since (a model retrained into the same directory, a
store calibrated again), are refused unless --overwrite. The label, --batch-size and --out are not
settings: a new --label renames the evaluation (metrics and figures) without measuring again.

Generated answers
-----------------
`--modes slow,fast,auto` scores something else: the model writes a rationale per question (greedy),
its answer is extracted and compared with the gold one, and its confidence is the probability of the
answer tokens it wrote. See first_kd.generation_eval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import List, Literal, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from first_kd import metrics
from first_kd.batching import length_batches, pad_right
from first_kd.config import option, to_dict
from first_kd.errors import FirstKDError
from first_kd.files import write_text_atomic
from first_kd.models import ModelOptions, head_logits, last_hidden_states
from first_kd.scoring import option_mask, options_from_logits, options_from_topk
from first_kd.outputs import exclusive_lock, say_done, settings_diff, staged_dir, writable_parent
from first_kd.temperature import describe as describe_temperature
from first_kd.data.rationale import RationaleConfig

# Elements of [rows, vocab] fp32 logits per output-head chunk (128 MiB): bounds memory for large vocabularies.
_HEAD_ELEMENTS = 1 << 25
# Store rows buffered before they are scored together.
_STORE_FLUSH_ROWS = 1 << 15
_GENERIC_DIR_NAMES = {"model", "final", "checkpoint", "checkpoints", "store"}
# Options that change how an evaluation runs, is named or where it goes, not what it measures.
SETTINGS_FREE = ("out", "label", "batch_size", "overwrite", "trust_remote_code")
# Options that only generated answers (--modes) use.
MODES_ONLY = ("max_new_tokens", "cue", "extractor", "qa_template")


@dataclasses.dataclass
class EvaluateConfig(ModelOptions, RationaleConfig):
    model: Optional[str] = option(None, help="model to evaluate: hub id or local path (e.g. a distill run's OUT/model)")
    store: Optional[str] = option(
        None, help="evaluate a teacher from its cached top-k store instead of a model (no --model / --data)")
    out: Optional[str] = option(None, help="output directory for metrics.json, predictions.jsonl, reliability.png")
    temperature: bool = option(
        True, help="with --store: apply the store's recorded temperature (--no-temperature: the raw top-k)")
    n_bins: int = option(10, help="equal-width confidence bins of ECE / MCE and the reliability diagram")
    label: Optional[str] = option(None, help="name shown in reports (default: from the model or store path)")
    tokenizer: Optional[str] = option(None, help="tokenizer path or hub id (default: the model's own)")
    batch_size: int = option(16, help="sequences per forward pass")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="model weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    modes: List[str] = option(
        [], help="score answers the model writes itself, per mode (comma-separated): slow = forced [slow] "
                 "marker, fast = forced [fast] marker, auto = the model picks; needs --model and question data "
                 "with answers (default: none, score the given targets)")
    max_new_tokens: int = option(256, help="with --modes: most tokens generated per answer")
    overwrite: bool = option(False, help="replace an evaluation in --out made with other settings or inputs "
                                         "(the same command on a finished evaluation is a no-op)")

    def validate(self):
        super().validate()
        if self.modes:
            from first_kd.generation_eval import MODES

            unknown = [m for m in self.modes if m not in MODES]
            if unknown:
                raise FirstKDError(f"--modes {','.join(self.modes)}: unknown mode {unknown[0]!r}; use "
                                   f"{', '.join(MODES)} (comma-separated)")
            if len(set(self.modes)) < len(self.modes):
                raise FirstKDError(f"--modes {','.join(self.modes)} names a mode twice; give each once")
            if self.store:
                raise FirstKDError("--modes has the model write its answers: give --model and --data, not --store")
            if self.max_new_tokens < 1:
                raise FirstKDError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.out:
            raise FirstKDError("missing --out (directory for metrics.json, predictions.jsonl, reliability.png)")
        if Path(self.out).is_file():
            raise FirstKDError(f"--out {self.out} is a file: give a directory for the evaluation outputs")
        if self.store and self.model:
            raise FirstKDError("give --model (with --data) or --store, not both")
        if self.store and self.data:
            raise FirstKDError("--store evaluates the data cached in the store: drop --data")
        if not self.store and not self.model:
            raise FirstKDError("missing --model (with --data), or --store to evaluate a cached teacher")
        if self.model and not self.data:
            raise FirstKDError("missing --data (the evaluation file or dataset for --model)")
        if self.n_bins < 1:
            raise FirstKDError(f"--n-bins must be >= 1, got {self.n_bins}")
        if self.batch_size < 1:
            raise FirstKDError(f"--batch-size must be >= 1, got {self.batch_size}")


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


def hidden_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
              cols: torch.Tensor) -> torch.Tensor:
    """Last hidden states [N, H] at (rows[i], cols[i]) of a right-padded batch [B, S]."""
    return last_hidden_states(model, input_ids, attention_mask)[rows, cols]


class _NLL:
    """Sum of -log p over samples with p > 0 (store scope) or all samples (clamped, model scope)."""

    def __init__(self):
        self.total, self.n = 0.0, 0

    def add(self, p_gold: np.ndarray, only_positive: bool) -> None:
        p = np.asarray(p_gold, dtype=np.float64)
        if only_positive:
            p = p[p > 0]
        self.total += float(np.sum(-np.log(np.maximum(p, metrics.NLL_EPS))))
        self.n += int(p.shape[0])

    def mean(self) -> Optional[float]:
        return self.total / self.n if self.n else None


def _finish(acc: metrics.CalibrationAccumulator, nll: _NLL, scope: str) -> dict:
    summary = acc.compute()
    summary["nll"] = nll.mean()
    summary["nll_scope"] = scope
    summary["nll_n"] = nll.n
    summary["bins"] = metrics.bins_to_json(acc.bins())
    return summary


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_model(model, tokenized, info: dict, pad_id: int, batch_size: int = 16, n_bins: int = 10,
                   device=None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Score a causal LM on tokenized examples (first_kd.data.prepare_dataset output).

    Returns (summary: metrics keys + "bins", "level"; predictions: one dict per example, in data order).
    """
    device = device or next(model.parameters()).device
    mcqa = info["format"] == "mcqa"
    labels = info.get("choice_labels") or []
    choice_ids = torch.tensor(info.get("choice_token_ids") or [], dtype=torch.long, device=device)
    vocab = model.get_output_embeddings().weight.shape[0]
    if mcqa and int(choice_ids.max()) >= vocab:
        raise FirstKDError(f"option letter token id {int(choice_ids.max())} is outside the model's {vocab} logits: "
                           "evaluate with the model's own tokenizer (--tokenizer)")
    input_ids = tokenized["input_ids"]
    starts = np.asarray(tokenized["target_start"], dtype=np.int64)
    ids = tokenized["id"]
    lengths = np.array([len(x) for x in input_ids], dtype=np.int64)
    acc = metrics.CalibrationAccumulator(n_bins)
    nll = _NLL()
    predictions: list[Optional[dict]] = [None] * len(ids)
    head_rows = max(1, _HEAD_ELEMENTS // vocab)
    unit = "q" if mcqa else "seq"
    bar = tqdm(total=len(ids), unit=unit, desc="evaluating", dynamic_ncols=True, disable=not progress)
    if mcqa:
        answer = np.asarray(tokenized["answer_index"], dtype=np.int64)
        n_choices = np.asarray(tokenized["n_choices"], dtype=np.int64)
    for batch in length_batches(lengths, batch_size):
        tokens, mask = pad_right([input_ids[i] for i in batch], pad_id, device)
        if mcqa:
            rows = torch.arange(len(batch), device=device)
            cols = torch.as_tensor(starts[batch] - 1, device=device)
            logits = head_logits(model, hidden_at(model, tokens, mask, rows, cols))  # [B, V]
            logp = torch.log_softmax(logits, dim=-1)
            n_ch = torch.as_tensor(n_choices[batch], device=device)
            gold = torch.as_tensor(answer[batch], device=device)
            probs = options_from_logits(logits[:, choice_ids], n_ch)  # [B, C]
            acc.update(probs, gold)
            p_gold = probs.gather(1, gold[:, None])[:, 0]
            nll.add(p_gold.cpu().numpy(), only_positive=False)
            conf, pred = probs.max(dim=-1)
            vocab_p = logp[:, choice_ids].exp() * option_mask(n_ch, len(choice_ids))
            p_pred_full = vocab_p.gather(1, pred[:, None])[:, 0]
            # one device -> host copy per batch, not one per number
            probs, conf, pred = probs.cpu().numpy(), conf.cpu().numpy(), pred.cpu().numpy()
            p_pred_full, options_mass = p_pred_full.cpu().numpy(), vocab_p.sum(dim=1).cpu().numpy()
            for r, i in enumerate(batch):
                n = int(n_choices[i])
                predictions[i] = {
                    "id": ids[i], "prediction": labels[int(pred[r])], "gold": labels[int(answer[i])],
                    "correct": bool(pred[r] == answer[i]), "confidence": float(conf[r]),
                    "option_probs": {labels[j]: float(probs[r, j]) for j in range(n)},
                    "p_pred_full": float(p_pred_full[r]), "options_mass": float(options_mass[r]),
                }
        else:
            row_list, col_list = [], []
            for r, i in enumerate(batch):
                positions = np.arange(starts[i] - 1, lengths[i] - 1)
                row_list.append(np.full(len(positions), r))
                col_list.append(positions)
            rows = torch.as_tensor(np.concatenate(row_list), device=device)
            cols = torch.as_tensor(np.concatenate(col_list), device=device)
            targets = tokens[rows, cols + 1]
            hidden = hidden_at(model, tokens, mask, rows, cols)
            conf_all, correct_all, gold_all = [], [], []
            for lo in range(0, hidden.shape[0], head_rows):
                sl = slice(lo, lo + head_rows)
                probs = torch.softmax(head_logits(model, hidden[sl]), dim=-1)
                acc.update(probs, targets[sl])
                conf, pred = probs.max(dim=-1)
                conf_all.append(conf)
                correct_all.append(pred == targets[sl])
                gold_all.append(probs.gather(1, targets[sl][:, None])[:, 0])
            conf_all = torch.cat(conf_all).cpu().numpy()
            correct_all = torch.cat(correct_all).cpu().numpy()
            gold_all = torch.cat(gold_all).double().cpu().numpy()
            nll.add(gold_all, only_positive=False)
            row_np = rows.cpu().numpy()
            for r, i in enumerate(batch):
                sel = row_np == r
                predictions[i] = _token_line(ids[i], conf_all[sel], correct_all[sel], gold_all[sel])
        bar.update(len(batch))
    bar.close()
    summary = _finish(acc, nll, "all")
    summary["level"] = "answer" if mcqa else "token"
    return summary, predictions


def _token_line(example_id: str, conf: np.ndarray, correct: np.ndarray, p_gold: np.ndarray) -> dict:
    return {"id": example_id, "n_tokens": int(len(conf)), "token_accuracy": float(np.mean(correct)),
            "mean_confidence": float(np.mean(conf)),
            "nll": float(np.mean(-np.log(np.maximum(p_gold, metrics.NLL_EPS)))) if np.any(p_gold > 0) else None}


# ----------------------------------------------------------------------------------------------
# Stores
# ----------------------------------------------------------------------------------------------


def evaluate_store(store, use_temperature: bool = True, n_bins: int = 10,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """Score a teacher from its cached top-k (see the module docstring for exactly what).

    Returns (summary: metrics keys + "bins", "level", "temperature"; predictions in store order)."""
    data = store.attrs.get("data") or {}
    mcqa = data.get("format") == "mcqa"
    record = store.temperature if use_temperature else {}
    acc = metrics.CalibrationAccumulator(n_bins)
    nll = _NLL()
    predictions: list[dict] = []
    bar = tqdm(total=len(store), unit="seq", desc="evaluating store", dynamic_ncols=True, disable=not progress)
    if mcqa:
        labels = list(data.get("choice_labels") or [])
        choice_ids = torch.tensor(store.choice_token_ids, dtype=torch.long)
        if not labels or len(labels) != len(choice_ids):
            raise FirstKDError(f"store {store.path} is a multiple-choice store without option token ids: re-create it "
                               "with `first-kd cache ... --overwrite`")
        buffer: list[dict] = []
        for i in range(len(store)):
            buffer.append(store.get(i, temperature=use_temperature))
            if len(buffer) >= _STORE_FLUSH_ROWS or i == len(store) - 1:
                predictions += _score_mcqa_rows(buffer, choice_ids, labels, acc, nll)
                bar.update(len(buffer))
                buffer = []
    else:
        buffer, rows = [], 0
        for i in range(len(store)):
            rec = store.get(i, temperature=use_temperature)
            buffer.append(rec)
            rows += len(rec["target_positions"])
            if rows >= _STORE_FLUSH_ROWS or i == len(store) - 1:
                predictions += _score_token_rows(buffer, acc, nll)
                bar.update(len(buffer))
                buffer, rows = [], 0
    bar.close()
    summary = _finish(acc, nll, "gold probability > 0")
    summary["level"] = "answer" if mcqa else "token"
    summary["temperature"] = record or None
    return summary, predictions


def _score_mcqa_rows(records: list[dict], choice_ids: torch.Tensor, labels: list[str],
                     acc: metrics.CalibrationAccumulator, nll: _NLL) -> list[dict]:
    # One target position per multiple-choice sequence: the answer position.
    topk_ids = torch.from_numpy(np.stack([r["topk_ids"][0] for r in records]))
    topk_probs = torch.from_numpy(np.stack([r["teacher_probs"][0] for r in records]))
    raw_logprobs = np.stack([r["topk_logprobs"][0] for r in records])
    n_ch = torch.tensor([r["n_choices"] for r in records], dtype=torch.long)
    gold = torch.tensor([r["answer_index"] for r in records], dtype=torch.long)
    probs = options_from_topk(topk_ids, topk_probs, choice_ids, n_ch)
    acc.update(probs, gold)
    p_gold = probs.gather(1, gold[:, None])[:, 0].numpy()
    nll.add(p_gold, only_positive=True)
    conf, pred = probs.max(dim=-1)
    out = []
    for r, rec in enumerate(records):
        letter_id = int(choice_ids[int(pred[r])])
        where = np.flatnonzero(rec["topk_ids"][0] == letter_id)
        n = int(n_ch[r])
        out.append({
            "id": rec["id"], "prediction": labels[int(pred[r])], "gold": labels[int(gold[r])],
            "correct": bool(pred[r] == gold[r]), "confidence": float(conf[r]),
            "option_probs": {labels[j]: float(probs[r, j]) for j in range(n)},
            # The teacher's raw (temperature 1) full-vocabulary probability, known only inside the top-k.
            "p_pred_full": float(np.exp(raw_logprobs[r, where[0]])) if len(where) else None,
            "options_in_topk": int(np.isin(rec["topk_ids"][0], choice_ids[:n].numpy()).sum()),
        })
    return out


def _score_token_rows(records: list[dict], acc: metrics.CalibrationAccumulator, nll: _NLL) -> list[dict]:
    probs_k = np.concatenate([r["teacher_probs"] for r in records])  # [N, k]
    ids_k = np.concatenate([r["topk_ids"] for r in records])
    targets = np.concatenate([r["input_ids"][r["target_positions"] + 1] for r in records])
    hit = ids_k == targets[:, None]
    inside = hit.any(axis=1)
    k = probs_k.shape[1]
    # A (k+1)-th class "outside the top-k" with probability 0 is the label of targets the top-k misses,
    # so multi-class Brier and NLL see them as the misses they are.
    probs = np.concatenate([probs_k, np.zeros((len(probs_k), 1), dtype=probs_k.dtype)], axis=1)
    labels = np.where(inside, hit.argmax(axis=1), k)
    acc.update(probs, labels)
    stats = metrics.top_label_statistics(probs, labels)
    nll.add(stats["p_gold"], only_positive=True)
    out, at = [], 0
    for rec in records:
        n = len(rec["target_positions"])
        sl = slice(at, at + n)
        out.append(_token_line(rec["id"], stats["confidence"][sl], stats["correct"][sl], stats["p_gold"][sl]))
        out[-1]["targets_in_topk"] = int(inside[sl].sum())
        at += n
    return out


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------


def default_label(path: str, suffix: str = "") -> str:
    """A readable run name from a path: skips generic folder names (a distill run's OUT/model ...)."""
    parts = [p for p in Path(path.rstrip("/")).parts if p not in ("/", ".", "..")]
    while len(parts) > 1 and (parts[-1] in _GENERIC_DIR_NAMES or parts[-1].startswith("step-")):
        parts.pop()
    name = parts[-1] if parts else str(path)
    for ext in (".zarr",):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return name + suffix


def clean_json(value):
    """NaN/inf -> None, recursively, so metrics.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Output directory: settings, the same-command no-op, staged writing
# ----------------------------------------------------------------------------------------------


def files_fingerprint(path: Optional[str]) -> Optional[str]:
    """A short digest of a local file's or directory's files (relative path, size, modification time), so a
    model retrained into the same directory or a data file rewritten is noticed without reading the bytes.
    None for what is not a local path (a hub id: its --revision is a setting of its own)."""
    if not path or not Path(path).exists():
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        name = f.name if f == root else f.relative_to(root).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def store_temperature(store, use_temperature: bool) -> Optional[dict]:
    """The temperature record an evaluation of `store` applies (None: the raw top-k)."""
    return (store.temperature if use_temperature else {}) or None


def evaluation_settings(cfg: EvaluateConfig, store=None) -> dict:
    """What an evaluation measures, as recorded in metrics.json["settings"] and compared by a re-run: the
    options (without SETTINGS_FREE, and for a store only those a store evaluation reads) and fingerprints of
    the inputs (the files of --model / --tokenizer / --data; the store's cached data and temperature)."""
    options = {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items() if k not in SETTINGS_FREE}
    if store is not None:
        record = store_temperature(store, cfg.temperature) or {}
        data = store.attrs.get("data") or {}
        return {"store": cfg.store, "temperature": cfg.temperature, "n_bins": cfg.n_bins,
                "store_data": data.get("fingerprint"), "store_sequences": len(store),
                "store_temperature": {k: record.get(k) for k in ("form", "value")} if record else None}
    if not cfg.modes:
        options = {k: v for k, v in options.items() if k not in MODES_ONLY}
    options.update(model_files=files_fingerprint(cfg.model), data_files=files_fingerprint(cfg.data))
    if cfg.tokenizer:
        options["tokenizer_files"] = files_fingerprint(cfg.tokenizer)
    return options


def is_evaluation_file(name: str) -> bool:
    """A file `first-kd evaluate` writes into --out (or a scratch file of an older version's writes)."""
    name = name[: -len(".tmp")] if name.endswith(".tmp") else name
    return name in ("metrics.json", "predictions.jsonl") or (name.startswith("reliability") and name.endswith(".png"))


def previous_evaluation(out: Path, settings: dict, overwrite: bool) -> Optional[dict]:
    """The metrics of the finished evaluation in `out` when it was made with `settings` (the re-run is then
    a no-op), or None when there is nothing to keep (no finished evaluation, or --overwrite).

    Refuses, in one line: an --out holding files that are not an evaluation's (they would be replaced with
    it, --overwrite or not), and without --overwrite an evaluation made with other settings or inputs."""
    if not out.is_dir():
        return None
    foreign = sorted(p.name for p in out.iterdir() if not is_evaluation_file(p.name))
    if foreign:
        more = " ..." if len(foreign) > 3 else ""
        raise FirstKDError(f"--out {out} holds files that are not an evaluation's ({', '.join(foreign[:3])}{more}): "
                           "give the evaluation a directory of its own")
    try:
        old = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None  # no finished evaluation (metrics.json is written last, atomically)
    if overwrite or not isinstance(old, dict):
        return None
    recorded = old.get("settings")
    if not isinstance(recorded, dict):
        raise FirstKDError(f"--out {out} holds an evaluation that does not record its settings (made by an older "
                           "first-kd): pass --overwrite to replace it, or choose another --out")
    changed = settings_diff(recorded, settings)
    if changed:
        raise FirstKDError(f"--out {out} holds an evaluation made with other settings or inputs ({changed}): "
                           "pass --overwrite to replace it, or choose another --out")
    return old


def _save_figures(directory: Path, summary: dict) -> None:
    from first_kd.plots import save_reliability_comparison, save_reliability_diagram

    label, modes = summary["label"], summary.get("modes")
    if not modes:
        save_reliability_diagram(summary, directory / "reliability.png", title=label)
        return
    for mode, s in modes.items():
        save_reliability_diagram(s, directory / f"reliability-{mode}.png", title=f"{label} [{mode}]")
    save_reliability_comparison([(f"{label} [{m}]", s["bins"], s) for m, s in modes.items()],
                                directory / "reliability.png")


@contextlib.contextmanager
def _naming(path: Path):
    """A failed write (full disk) raises an OSError that names no file: name the one being written."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def write_evaluation(directory: Path, summary: dict, predictions: Optional[list]) -> None:
    """predictions.jsonl (unless None), the reliability figure(s) and metrics.json, last, into `directory`
    (a staged one: `first_kd.outputs.staged_dir`)."""
    if predictions is not None:
        with _naming(directory / "predictions.jsonl"), open(directory / "predictions.jsonl", "w") as f:
            for line in predictions:
                f.write(json.dumps(line) + "\n")
    _save_figures(directory, summary)
    with _naming(directory / "metrics.json"):
        write_text_atomic(directory / "metrics.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")


def relabel(out: Path, metrics_now: dict, label: str) -> int:
    """Give the finished evaluation in `out` another label (metrics.json and the figures' titles) without
    measuring again: the label names the evaluation, it is not a setting of it."""
    old = metrics_now.get("label")
    with staged_dir(out.resolve()) as stage:
        if (out / "predictions.jsonl").is_file():
            try:
                os.link(out / "predictions.jsonl", stage / "predictions.jsonl")
            except OSError:  # a filesystem without hard links
                shutil.copyfile(out / "predictions.jsonl", stage / "predictions.jsonl")
        write_evaluation(stage, {**metrics_now, "label": label}, None)
    print(f"first-kd evaluate: {out} already holds this evaluation (same settings and inputs): renamed {old!r} -> "
          f"{label!r}, nothing measured again")
    return 0


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------


def _measure_store(cfg: EvaluateConfig, store) -> tuple[dict, list[dict]]:
    if cfg.temperature and not store.temperature:
        print(f"first-kd evaluate: note: {cfg.store} has no temperature record (run `first-kd calibrate`); "
              "evaluating the raw top-k")
    summary, predictions = evaluate_store(store, cfg.temperature, cfg.n_bins)
    data = store.attrs.get("data") or {}
    summary.update(model=(store.attrs.get("teacher") or {}).get("name"), data=data.get("source"),
                   split=data.get("split"), store=str(cfg.store), source="store", k=store.k)
    return summary, predictions


def _measure_model(cfg: EvaluateConfig) -> tuple[dict, list[dict]]:
    from accelerate import PartialState

    from first_kd.data import prepare_dataset
    from first_kd.models import load_model, load_tokenizer, resolve_dtype

    device = PartialState(cpu=not torch.cuda.is_available()).device
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
    tokenized, info = prepare_dataset(cfg, tokenizer)
    model = load_model(cfg.model, dtype, device, cfg.revision, cfg.trust_remote_code)
    summary, predictions = evaluate_model(model, tokenized, info, tokenizer.pad_token_id, cfg.batch_size,
                                          cfg.n_bins, device)
    summary.update(model=cfg.model, data=cfg.data, split=cfg.split, source="model",
                   dtype=str(dtype).replace("torch.", ""), temperature=None)
    if info.get("n_truncated"):
        summary["n_truncated"] = int(info["n_truncated"])
    return summary, predictions


def _say_result(summary: dict, out: Path) -> None:
    label = summary["label"]
    for mode, s in (summary.get("modes") or {}).items():
        chosen = ""
        if s.get("chosen_modes"):
            chosen = ", chose " + " / ".join(f"{c} {share:.0%}" for c, share in s["chosen_modes"].items())
        print(f"first-kd evaluate: {label} [{mode}]: accuracy {s['accuracy']:.4f}, ECE {s['ece']:.4f}, mean "
              f"confidence {s['mean_confidence']:.4f}, {s['mean_generated_tokens']:.1f} tokens, no answer "
              f"{s['no_answer_rate']:.0%}{chosen} over {s['n']:,} questions")
    if summary.get("modes"):
        print(f"first-kd evaluate: -> {out / 'metrics.json'}")
        return
    nll = "n/a" if summary["nll"] is None else f"{summary['nll']:.4f}"
    print(f"first-kd evaluate: {label}: accuracy {summary['accuracy']:.4f}, ECE {summary['ece']:.4f}, "
          f"NLL {nll}, mean confidence {summary['mean_confidence']:.4f} over {summary['n']:,} "
          f"{'questions' if summary['level'] == 'answer' else 'tokens'} -> {out / 'metrics.json'}")


def run_evaluate(cfg: EvaluateConfig) -> int:
    """Measure, then write into a staged directory that replaces --out only when complete; the same
    command on a finished evaluation is a no-op, other settings are refused (see the module docstring)."""
    out = Path(cfg.out)
    writable_parent(out)  # before anything loads: a read-only or blocked --out costs nothing
    with exclusive_lock(out.resolve(), "evaluate"):  # resolved: an --out of "." has a name and a parent
        store = None
        if cfg.store:
            from first_kd.store import open_store

            store = open_store(cfg.store)
        if cfg.label:
            label = cfg.label
        elif store is not None:
            label = default_label(cfg.store, f" teacher {describe_temperature(store_temperature(store, cfg.temperature))}")
        else:
            label = default_label(cfg.model)
        settings = evaluation_settings(cfg, store)
        previous = previous_evaluation(out, settings, cfg.overwrite)
        if previous is not None:
            if previous.get("label") == label:
                return say_done("evaluate", out, "an evaluation")
            return relabel(out, previous, label)
        with staged_dir(out.resolve()) as stage:
            if cfg.modes:
                from first_kd.generation_eval import generate_and_score

                summary, predictions = generate_and_score(cfg)
            elif store is not None:
                summary, predictions = _measure_store(cfg, store)
            else:
                summary, predictions = _measure_model(cfg)
            summary = clean_json({**summary, "label": label, "settings": settings})
            write_evaluation(stage, summary, predictions)
    _say_result(summary, out)
    return 0
