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

Generated answers (`--modes slow,fast,auto`)
--------------------------------------------
The model writes its own answers, scored for accuracy and calibration (first_kd.scoring.evaluate_generation).
Per question and mode the model decodes greedily from
  * slow / fast: the prompt ids followed by the ids of `marker + step_separator` ([slow] or [fast] and a
    newline by default), tokenized on their own exactly as `first_kd.data.traces.marker_prefix_ids` makes them
    for training (first_kd.data with --trace-levels), so the forced start is token for token what the
    model learnt to continue (first_kd.decoding.mode_inputs);
  * auto: the model chooses. With --auto-choice sample (the default) its marker is drawn from its own
    probabilities of the two marker prefixes after the prompt (first_kd.decoding.marker_probabilities /
    choose_modes; per question, seeded by --auto-seed and the question id), written as the completion's
    first tokens, and the rest decoded greedily: an auto answer is the forced-mode answer of the mode it
    drew. --auto-choice greedy decodes greedily from the prompt ids alone (the argmax marker: the same one for
    nearly every question, since the training levels are drawn independently of the question; see
    first_kd/decoding.py). A model trained without markers (under 0.5 of its mass on the two) just answers.
    The completion's first text tells which mode was taken (`first_kd.scoring.completion_mode`).
The prompt ids are the question prompt (first_kd.data.rationale.load_questions: it ends with the reasoning
cue) tokenized WITH the tokenizer's special tokens, as first_kd.data tokenizes training prompts.

answer      the rationale extractor's last match in the completion (first_kd.data.rationale.find_answer),
            normalised; correct = it equals the gold answer.
confidence  the model's probability of that answer given its own completion: exp of the summed
            log-probs of the generated tokens that spell it (the tokens whose decoded text overlaps
            the answer's characters, `first_kd.decoding.answer_token_span`), from one teacher-forced pass
            over prompt + completion. A completion without an extractable answer is incorrect with
            confidence 0 (the model committed to no answer; counted in no_answer_rate too).
tokens      generated tokens including eos, excluding the forced marker (in auto the model writes its
            marker itself, so it counts).

Per mode: accuracy, ECE, MCE (equal-width bins), Brier of the binary correct-vs-confidence, mean
confidence, n, mean_generated_tokens, no_answer_rate, finished_rate (eos before --max-new-tokens) and,
for auto, the fractions of completions that chose each marker ("chosen_modes": slow / fast / none) and the
spread of the model's P(slow) / (P(slow) + P(fast)) over the questions ("p_slow": mean, std, min, max, n).
There is no NLL: the gold answer's likelihood is not what a free-running completion measures.

A prediction line: {"id", "mode", "completion" (decoded, special tokens skipped, up to eos), "answer"
(normalised or null), "gold", "correct", "confidence", "n_generated_tokens", "finished" (eos reached),
"chosen_mode" (auto: slow / fast / none; null for forced modes), "p_slow" (auto only: the model's share
of slow between the two markers, null for a model without them), "forced_ids" (the marker ids forced
after the prompt: [] in auto, where the chosen marker's ids open completion_ids), "completion_ids" (generated ids, eos included), "answer_tokens" ([first, last) into
completion_ids, or null)}: enough to recompute any confidence with a plain forward pass.

Outputs in --out: predictions.jsonl (one line per question and mode), reliability-MODE.png per mode,
reliability.png (all modes side by side) and metrics.json, written last: its top level is the first
mode's metrics in the schema of the other evaluations (so `first-kd report` reads it), plus
"modes": {mode: metrics}. They are staged and swapped in, and re-runs compared, as for every evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import List, Literal, Optional

import torch

from first_kd.config import option, to_dict
from first_kd.data.rationale import RationaleConfig
from first_kd.decoding import MODES
from first_kd.errors import FirstKDError
from first_kd.files import clean_json, name_errors, write_json_atomic
from first_kd.models import ModelOptions
from first_kd.outputs import exclusive_lock, say_done, settings_diff, staged_dir, writable_parent
from first_kd.scoring import evaluate_generation, evaluate_model, evaluate_store
from first_kd.temperature import describe as describe_temperature

_GENERIC_DIR_NAMES = {"model", "final", "checkpoint", "checkpoints", "store"}
# Options that change how an evaluation runs, is named or where it goes, not what it measures.
SETTINGS_FREE = ("out", "label", "batch_size", "overwrite", "trust_remote_code")
# Options that only generated answers (--modes) use.
MODES_ONLY = ("max_new_tokens", "cue", "extractor", "qa_template", "auto_seed", "auto_choice")


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
    auto_choice: Literal["sample", "greedy"] = option(
        "sample", help="with --modes auto: how the model's choice of marker is read: sample = drawn from its own "
                       "probabilities of [slow] and [fast] after the prompt, per question; greedy = plain greedy "
                       "decoding, which picks the same marker for nearly every question (see first_kd/decoding.py)")
    auto_seed: int = option(0, help="with --modes auto: seed of the marker draws (a question's draw depends only on "
                                    "this seed and its id)")
    overwrite: bool = option(False, help="replace an evaluation in --out made with other settings or inputs "
                                         "(the same command on a finished evaluation is a no-op)")

    def validate(self):
        super().validate()
        if self.modes:
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
# Labels
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


def write_evaluation(directory: Path, summary: dict, predictions: Optional[list]) -> None:
    """predictions.jsonl (unless None), the reliability figure(s) and metrics.json, last, into `directory`
    (a staged one: `first_kd.outputs.staged_dir`)."""
    if predictions is not None:
        with name_errors(directory / "predictions.jsonl"), open(directory / "predictions.jsonl", "w") as f:
            for line in predictions:
                f.write(json.dumps(line) + "\n")
    _save_figures(directory, summary)
    with name_errors(directory / "metrics.json"):
        write_json_atomic(directory / "metrics.json", summary)


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


def _measure_generation(cfg: EvaluateConfig) -> tuple[dict, list[dict]]:
    """`--modes`: the metrics.json body without the label (the first mode's metrics at the top level, every
    mode's under "modes") and the prediction lines."""
    from accelerate import PartialState

    from first_kd.data import load_records, unescape
    from first_kd.data.rationale import load_questions
    from first_kd.models import load_model, load_tokenizer, resolve_dtype

    device = PartialState(cpu=not torch.cuda.is_available()).device
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
    questions = load_questions(load_records(cfg), cfg)
    model = load_model(cfg.model, dtype, device, cfg.revision, cfg.trust_remote_code)
    summaries, lines = evaluate_generation(
        model, tokenizer, questions, cfg.modes, cfg.extractor, cfg.slow_marker, cfg.fast_marker,
        unescape(cfg.step_separator), cfg.max_new_tokens, cfg.batch_size, cfg.n_bins, cfg.chat_template, device,
        auto_seed=cfg.auto_seed, auto_choice=cfg.auto_choice)
    summary = {**summaries[cfg.modes[0]], "model": cfg.model, "data": cfg.data, "split": cfg.split,
               "source": "model", "dtype": str(dtype).replace("torch.", ""), "temperature": None,
               "extractor": cfg.extractor, "cue": cfg.cue, "max_new_tokens": cfg.max_new_tokens, "modes": summaries}
    return summary, lines


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
                summary, predictions = _measure_generation(cfg)
            elif store is not None:
                summary, predictions = _measure_store(cfg, store)
            else:
                summary, predictions = _measure_model(cfg)
            summary = clean_json({**summary, "label": label, "settings": settings})
            write_evaluation(stage, summary, predictions)
    _say_result(summary, out)
    return 0
