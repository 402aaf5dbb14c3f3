"""Measuring answers: how accurate and how calibrated a model, a cached teacher or a model's own written
answers are.

  * option probabilities of multiple-choice items (`options_from_logits`, `options_from_topk`): pure
    functions of tensors, shared by `evaluate` and the trainer's validation;
  * `evaluate_model`: a causal LM on tokenized data, at the answer position (multiple choice: the option
    letters renormalised over the item's options) or at every target token (prompt/response);
  * `evaluate_store`: a teacher from its cached top-k (options absent from the top-k get 0);
  * `evaluate_generation`: answers the model writes itself, per reasoning mode (greedy decoding, the
    answer extracted from the completion, its confidence the probability of the answer tokens written).

What is scored, exactly, is written in `first_kd.commands.evaluate` (the command that prints and saves it).
Every function returns (summary: the metrics keys of `first_kd.metrics` + "bins", "level"; one prediction
line per example, in data order).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from first_kd import metrics
from first_kd.batching import length_batches, pad_right
from first_kd.data import encode_prompts
from first_kd.decoding import (answer_token_span, choose_modes, decoded_token_ends, greedy_generate, marker_probabilities,
                               mode_inputs, span_logprobs)
from first_kd.errors import FirstKDError
from first_kd.models import head_logits, last_hidden_states, stop_token_ids
from first_kd.temperature import teacher_target

# Elements of [rows, vocab] fp32 logits per output-head chunk (128 MiB): bounds memory for large vocabularies.
_HEAD_ELEMENTS = 1 << 25
# Store rows buffered before they are scored together.
_STORE_FLUSH_ROWS = 1 << 15
# What an auto-mode completion can start with (`completion_mode`).
CHOICES = ("slow", "fast", "none")


# ----------------------------------------------------------------------------------------------
# Option probabilities (multiple choice)
# ----------------------------------------------------------------------------------------------


def option_mask(n_choices: torch.Tensor, n_options: int) -> torch.Tensor:
    """[B, C] bool, True for the options an item has (the first n_choices[b] letters)."""
    return torch.arange(n_options, device=n_choices.device)[None, :] < n_choices[:, None]


def options_from_logits(option_logits: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
    """Renormalise letter logits over each item's options.

    Args:
        option_logits: [B, C] logits of the option letters A.. (C = most options of any item).
        n_choices: [B] number of options of each item (1..C).
    Returns:
        [B, C] fp32 probabilities, 0 for letters beyond an item's options.
    """
    mask = option_mask(n_choices, option_logits.shape[1])
    return torch.softmax(option_logits.float().masked_fill(~mask, float("-inf")), dim=-1)


def options_from_topk(topk_ids: torch.Tensor, topk_probs: torch.Tensor, choice_ids: torch.Tensor,
                      n_choices: torch.Tensor) -> torch.Tensor:
    """Option probabilities from a top-k distribution: absent options get 0, then renormalise.

    Args:
        topk_ids: [B, k] token ids; topk_probs: [B, k] their probabilities (after temperature).
        choice_ids: [C] token id of each option letter; n_choices: [B] options per item.
    Returns:
        [B, C] fp32, rows summing to 1 over the item's options; uniform over them when none is in the top-k.
    """
    match = topk_ids[:, :, None] == choice_ids[None, None, :]  # [B, k, C]
    mass = (topk_probs.float()[:, :, None] * match).sum(dim=1)  # [B, C]
    mask = option_mask(n_choices, choice_ids.shape[0])
    mass = mass * mask
    total = mass.sum(dim=1, keepdim=True)
    uniform = mask.float() / n_choices[:, None].float()
    return torch.where(total > 0, mass / total.clamp(min=torch.finfo(torch.float32).tiny), uniform)


# ----------------------------------------------------------------------------------------------
# Pieces shared by the evaluations
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

def full_vocabulary_rows(option_probs: torch.Tensor, n_choices: torch.Tensor, gold: torch.Tensor) -> dict:
    """The model's own (full-vocabulary) probabilities of the option letters, scored as they are.

    Args:
        option_probs: [B, C] full-vocabulary probability of each option letter at the answer position
            (not renormalised; letters beyond an item's options are ignored). Their sum is the mass on the
            options; the rest (1 - sum) is everything else the model could say.
        n_choices: [B] options per item; gold: [B] gold option index.
    Returns:
        dict of float64 numpy [B]: "confidence" (the probability of the most probable option, the
        model's answer), "correct", "p_gold", "brier" (over the options plus "anything else" as one more
        class, which is never the gold one) and "options_mass".
    """
    probs = option_probs.double() * option_mask(n_choices, option_probs.shape[1])
    mass = probs.sum(dim=1)
    conf, pred = probs.max(dim=1)
    p_gold = probs.gather(1, gold[:, None])[:, 0]
    onehot = torch.nn.functional.one_hot(gold, probs.shape[1]).double()
    brier = ((probs - onehot) ** 2).sum(dim=1) + (1.0 - mass).clamp(min=0.0) ** 2
    return {"confidence": conf.cpu().numpy(), "correct": (pred == gold).double().cpu().numpy(),
            "p_gold": p_gold.cpu().numpy(), "brier": brier.cpu().numpy(), "options_mass": mass.cpu().numpy()}


class FullVocabulary:
    """Streams `full_vocabulary_rows` into the "full_vocabulary" block of a multiple-choice summary."""

    def __init__(self, n_bins: int):
        self.acc = metrics.CalibrationAccumulator(n_bins)
        self.mass_sum = 0.0

    def add(self, option_probs: torch.Tensor, n_choices: torch.Tensor, gold: torch.Tensor) -> dict:
        rows = full_vocabulary_rows(option_probs, n_choices, gold)
        self.acc.update_confidence(np.clip(rows["confidence"], 0.0, 1.0), rows["correct"],
                                   np.clip(rows["p_gold"], 0.0, 1.0), rows["brier"])
        self.mass_sum += float(rows["options_mass"].sum())
        return rows

    def summary(self) -> dict:
        out = {k: v for k, v in self.acc.compute().items() if k in metrics.MODEL_SUMMARY_KEYS or k == "n"}
        out["mean_options_mass"] = self.mass_sum / max(self.acc.n, 1)
        return out


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
    full = FullVocabulary(n_bins) if mcqa else None
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
            full.add(vocab_p, n_ch, gold)
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
    if mcqa:
        summary["full_vocabulary"] = full.summary()
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
    full = FullVocabulary(n_bins) if mcqa else None
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
                _full_vocabulary_of_store(buffer, choice_ids, record, full)
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
    if mcqa:
        summary["full_vocabulary"] = full.summary()
    return summary, predictions


def _full_vocabulary_of_store(records: list[dict], choice_ids: torch.Tensor, record: dict,
                              full: FullVocabulary) -> None:
    """A cached teacher's full-vocabulary option probabilities: its top-k after the temperature, scaled to
    the top-k's own mass (first_kd.temperature: the other bucket keeps the rest); 0 outside the top-k."""
    lp = torch.from_numpy(np.stack([r["topk_logprobs"][0] for r in records]))
    topk_ids = torch.from_numpy(np.stack([r["topk_ids"][0] for r in records]))
    probs = teacher_target(lp, record, other_bucket=True)[:, :-1]  # [B, k]
    match = topk_ids[:, :, None] == choice_ids[None, None, :]  # [B, k, C]
    option_probs = (probs.double()[:, :, None] * match).sum(dim=1)
    n_ch = torch.tensor([r["n_choices"] for r in records], dtype=torch.long)
    gold = torch.tensor([r["answer_index"] for r in records], dtype=torch.long)
    full.add(option_probs, n_ch, gold)


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
# Answers the model writes itself (`first-kd evaluate --modes`)
# ----------------------------------------------------------------------------------------------


def completion_mode(completion: str, slow_marker: str, fast_marker: str) -> str:
    """"slow" / "fast" when the completion (leading whitespace ignored) starts with that marker, else "none"."""
    text = completion.lstrip()
    if text.startswith(slow_marker):
        return "slow"
    if text.startswith(fast_marker):
        return "fast"
    return "none"


def summarize_generation(lines: list[dict], n_bins: int = 10) -> dict:
    """Metrics of one mode from its prediction lines (each with "correct", "confidence", "answer",
    "n_generated_tokens", "finished", "chosen_mode")."""
    conf = np.array([x["confidence"] for x in lines], dtype=np.float64)
    correct = np.array([x["correct"] for x in lines], dtype=np.float64)
    acc = metrics.CalibrationAccumulator(n_bins)
    acc.update_confidence(conf, correct)
    summary = acc.compute()
    summary.update(
        brier=metrics.top_label_brier_score(conf, correct), nll=None, nll_scope=None, nll_n=0,
        bins=metrics.bins_to_json(acc.bins()), level="generation",
        mean_generated_tokens=float(np.mean([x["n_generated_tokens"] for x in lines])),
        no_answer_rate=float(np.mean([x["answer"] is None for x in lines])),
        finished_rate=float(np.mean([x["finished"] for x in lines])),
    )
    chosen = [x.get("chosen_mode") for x in lines]
    if any(c is not None for c in chosen):
        summary["chosen_modes"] = {c: float(np.mean([x == c for x in chosen])) for c in CHOICES}
    shares = np.array([x["p_slow"] for x in lines if x.get("p_slow") is not None], dtype=np.float64)
    if shares.size:  # auto mode: how the model's P(slow marker) spreads over the questions
        summary["p_slow"] = {"mean": float(shares.mean()), "std": float(shares.std()), "min": float(shares.min()),
                             "max": float(shares.max()), "n": int(shares.size)}
    return summary


def evaluate_generation(model, tokenizer, questions, modes: list[str], extractor: str, slow_marker: str = "[slow]",
                        fast_marker: str = "[fast]", separator: str = "\n", max_new_tokens: int = 256,
                        batch_size: int = 16, n_bins: int = 10, chat_template: bool = False, device=None,
                        progress: bool = True, auto_seed: int = 0, auto_choice: str = "sample"
                        ) -> tuple[dict, list[dict]]:
    """Generate and score every question in every mode (what is scored: `first_kd.commands.evaluate`).

    Per question and mode the model decodes greedily from the prompt ids (the question prompt tokenized with
    the tokenizer's special tokens, `first_kd.data.encode_prompts`) followed, in slow / fast, by the marker ids
    it was trained to continue (`first_kd.decoding.mode_inputs`); in auto, by the marker the model chooses
    (`auto_choice` "sample": drawn from its own probabilities of the two markers with `auto_seed`, per
    question; "greedy": plain greedy decoding from the prompt, which picks the same marker for nearly every
    question: see first_kd.decoding), written into the completion as the model's own tokens. The answer is
    the extractor's last match in the completion; its confidence the probability of the generated tokens that
    spell it, from one teacher-forced pass (`first_kd.decoding.span_logprobs`); no answer = incorrect with
    confidence 0.

    questions: first_kd.data.rationale.Question list, each with a gold answer.
    Returns ({mode: metrics}, prediction lines: mode by mode, questions in data order within a mode).
    """
    missing = [q.id for q in questions if q.gold is None]
    if missing:
        raise FirstKDError(f"{len(missing)} question(s) have no gold answer (first: id {missing[0]}): evaluating "
                           f"generated answers needs them; point --answer-field at the answers")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = stop_token_ids(model, tokenizer)
    prompts = encode_prompts(tokenizer, [q.prompt for q in questions], chat_template)
    summaries, lines = {}, []
    for mode in modes:
        written, p_slow = [[] for _ in prompts], [None] * len(prompts)
        if mode == "auto":  # the model's chosen marker, written as its own first tokens
            written, p_slow = auto_decisions(model, tokenizer, prompts, [q.id for q in questions], slow_marker,
                                             fast_marker, separator, pad_id, batch_size, device, auto_seed,
                                             auto_choice)
        inputs, forced = mode_inputs(prompts, mode, tokenizer, slow_marker, fast_marker, separator)
        budget = max_new_tokens - min(len(w) for w in written)
        generated = greedy_generate(model, [x + w for x, w in zip(inputs, written)], pad_id, eos_ids, budget,
                                    batch_size, device, progress, desc=f"generating ({mode})")
        generated = [w + g[: max_new_tokens - len(w)] for w, g in zip(written, generated)]
        mode_lines = score_completions(model, tokenizer, questions, prompts, generated, mode, forced, extractor,
                                       eos_ids, pad_id, batch_size, device, slow_marker, fast_marker)
        for line, p in zip(mode_lines, p_slow):
            if mode == "auto":
                line["p_slow"] = p
        summaries[mode] = summarize_generation(mode_lines, n_bins)
        summaries[mode]["mode"] = mode
        lines += mode_lines
    return summaries, lines


def auto_decisions(model, tokenizer, prompts: list[list[int]], keys: list[str], slow_marker: str, fast_marker: str,
                   separator: str, pad_id: int, batch_size: int, device, seed: int, choice: str
                   ) -> tuple[list[list[int]], list[Optional[float]]]:
    """Auto mode's marker per question: (the marker ids the model writes first, [] when it does not choose
    one: a model without markers, or `choice` "greedy", where decoding decides; P(slow) / (P(slow) + P(fast))
    per question, None below first_kd.decoding.MARKER_MASS)."""
    from first_kd.data.traces import marker_prefix_ids

    ids = {m: marker_prefix_ids(tokenizer, marker, separator) for m, marker in (("slow", slow_marker),
                                                                                   ("fast", fast_marker))}
    probs = marker_probabilities(model, prompts, ids["slow"], ids["fast"], pad_id, batch_size, device)
    chosen = choose_modes(probs, keys, seed, sample=True)
    shares = [float(p[0] / p.sum()) if c is not None else None for p, c in zip(probs, chosen)]
    if choice == "greedy":
        return [[] for _ in prompts], shares
    return [ids[c] if c is not None else [] for c in chosen], shares


def score_completions(model, tokenizer, questions, prompts: list[list[int]], generated: list[list[int]], mode: str,
                      forced: list[int], extractor: str, eos_ids, pad_id: int, batch_size: int, device,
                      slow_marker: str, fast_marker: str) -> list[dict]:
    """The prediction lines of one mode: each completion's answer, correctness and confidence (the answer
    tokens' probability given prompt + forced ids + completion, one teacher-forced pass)."""
    from first_kd.data.rationale import compile_extractor, find_answer

    pattern = compile_extractor(extractor)
    mode_lines, to_score = [], []
    for q, prompt, gen in zip(questions, prompts, generated):
        x = prompt + forced
        finished = bool(gen) and gen[-1] in eos_ids
        text_ids = gen[:-1] if finished else gen
        completion = tokenizer.decode(text_ids, skip_special_tokens=True)
        found = find_answer(completion, pattern)
        span = None
        if found is not None:
            span = answer_token_span(decoded_token_ends(tokenizer, text_ids), found[1], found[2])
        line = {"id": q.id, "mode": mode, "completion": completion, "answer": found[0] if found else None,
                "gold": q.gold, "correct": bool(found and span and found[0] == q.gold), "confidence": 0.0,
                "n_generated_tokens": len(gen), "finished": finished,
                "chosen_mode": completion_mode(completion, slow_marker, fast_marker) if mode == "auto" else None,
                "forced_ids": forced, "completion_ids": gen, "answer_tokens": list(span) if span else None}
        if span is not None:
            to_score.append((len(mode_lines), x + gen, (len(x) + span[0], len(x) + span[1])))
        mode_lines.append(line)
    if to_score:
        logps = span_logprobs(model, [s for _, s, _ in to_score], [p for _, _, p in to_score], pad_id,
                              batch_size, device)
        for (k, _, _), logp in zip(to_score, logps):
            mode_lines[k]["confidence"] = float(min(1.0, np.exp(logp)))
    return mode_lines
