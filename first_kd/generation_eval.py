"""`first-kd evaluate --modes slow,fast,auto`: a model writes its own answers, scored for accuracy and
calibration.

Per question and mode the model decodes greedily from
  * slow / fast: the prompt ids followed by the ids of `marker + step_separator` ([slow] or [fast] and a
    newline by default), tokenized on their own exactly as `first_kd.data.traces.marker_prefix_ids` makes them
    for training (first_kd.data with --trace-levels), so the forced start is token for token what the
    model learnt to continue;
  * auto: the prompt ids only: a model trained on both markers picks one (its completion's first text
    tells which: `completion_mode`), a model trained without markers just answers.
The prompt ids are the question prompt (first_kd.data.rationale.load_questions: it ends with the reasoning
cue) tokenized WITH the tokenizer's special tokens, as data.py tokenizes training prompts.

What is scored
--------------
answer      the rationale extractor's last match in the completion (first_kd.data.rationale.find_answer),
            normalised; correct = it equals the gold answer.
confidence  the model's probability of that answer given its own completion: exp of the summed
            log-probs of the generated tokens that spell it (the tokens whose decoded text overlaps
            the answer's characters, `answer_token_span`), from one teacher-forced pass over
            prompt + completion. A completion without an extractable answer is incorrect with
            confidence 0 (the model committed to no answer; counted in no_answer_rate too).
tokens      generated tokens including eos, excluding the forced marker (in auto the model writes its
            marker itself, so it counts).

Per mode: accuracy, ECE, MCE (equal-width bins), Brier of the binary correct-vs-confidence, mean
confidence, n, mean_generated_tokens, no_answer_rate, finished_rate (eos before --max-new-tokens) and,
for auto, the fractions of completions that chose each marker ("chosen_modes": slow / fast / none).
There is no NLL: the gold answer's likelihood is not what a free-running completion measures.

A prediction line: {"id", "mode", "completion" (decoded, special tokens skipped, up to eos), "answer"
(normalised or null), "gold", "correct", "confidence", "n_generated_tokens", "finished" (eos reached),
"chosen_mode" (auto: slow / fast / none; null for forced modes), "forced_ids" (the marker ids forced
after the prompt), "completion_ids" (generated ids, eos included), "answer_tokens" ([first, last) into
completion_ids, or null)}: enough to recompute any confidence with a plain forward pass.

Outputs in --out: predictions.jsonl (one line per question and mode), reliability-MODE.png per mode,
reliability.png (all modes side by side) and metrics.json, written last: its top level is the first
mode's metrics in the schema of the other evaluations (so `first-kd report` reads it), plus
"modes": {mode: metrics}. `first_kd.commands.evaluate.run_evaluate` writes them as it writes every evaluation:
staged beside --out and swapped in when complete, the same command a no-op, other settings refused.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from first_kd import metrics
from first_kd.data import encode_prompts
from first_kd.errors import FirstKDError
from first_kd.models import stop_token_ids

MODES = ("slow", "fast", "auto")
CHOICES = ("slow", "fast", "none")  # what an auto completion can start with


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def completion_mode(completion: str, slow_marker: str, fast_marker: str) -> str:
    """"slow" / "fast" when the completion (leading whitespace ignored) starts with that marker, else "none"."""
    text = completion.lstrip()
    if text.startswith(slow_marker):
        return "slow"
    if text.startswith(fast_marker):
        return "fast"
    return "none"


def answer_token_span(token_ends: Sequence[int], start: int, end: int) -> Optional[tuple[int, int]]:
    """Tokens [first, last) whose decoded text overlaps the characters [start, end) of a completion.

    Args:
        token_ends: [T] non-decreasing; token_ends[j] = number of characters decoded from tokens 0..j
            (so token j covers characters [token_ends[j-1], token_ends[j]); token 0 starts at 0).
        start, end: character span of the answer (first_kd.data.rationale.find_answer), start < end.
    Returns:
        (first, last) token indices, or None when no token reaches the span (it lies beyond the text).
    A token that completes no character (the leading bytes of a multi-byte character, or a skipped
    special token) belongs with the next token that does, so the bytes of an answer's first character are
    never left out.
    """
    if not 0 <= start < end:
        raise ValueError(f"answer span must satisfy 0 <= start < end, got ({start}, {end})")
    ends = [int(e) for e in token_ends]
    begins = [0] + ends[:-1]
    if any(e < b for b, e in zip(begins, ends)):
        raise ValueError("token_ends must be non-decreasing")
    # Effective end of each token: its own end, or for an empty token the end of the next non-empty one.
    reach = list(ends)
    for j in range(len(ends) - 2, -1, -1):
        if ends[j] == begins[j]:
            reach[j] = reach[j + 1]
    chosen = [j for j in range(len(ends)) if begins[j] < end and reach[j] > start]
    return (chosen[0], chosen[-1] + 1) if chosen else None


def decoded_token_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """token_ends for `answer_token_span`: for each j, how many characters of decode(ids) the prefix
    ids[:j+1] has decoded (its common prefix with the full text, so a prefix that ends inside a multi-byte
    character counts only the characters it completes)."""
    full = tokenizer.decode(list(ids), skip_special_tokens=True)
    prefixes = tokenizer.batch_decode([list(ids[: j + 1]) for j in range(len(ids))], skip_special_tokens=True)
    ends, best = [], 0
    for text in prefixes:
        n = min(len(text), len(full))
        k = 0
        while k < n and text[k] == full[k]:
            k += 1
        best = max(best, k)  # non-decreasing even if a decoder rewrites an earlier character
        ends.append(best)
    return ends


def summarize(lines: list[dict], n_bins: int = 10) -> dict:
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
    return summary


# ----------------------------------------------------------------------------------------------
# Model passes
# ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def greedy_generate(model, inputs: list[list[int]], pad_id: int, eos_ids: list[int], max_new_tokens: int,
                    batch_size: int = 16, device=None, progress: bool = True,
                    desc: str = "generating") -> list[list[int]]:
    """Greedy continuations of `inputs` (token id lists), up to and including the first eos (when reached).

    Batches are left-padded and length-sorted. The model's own generation defaults (sampling, repetition
    penalties ...) are set aside for the call, so this is plain argmax decoding.
    """
    from transformers import GenerationConfig

    device = device or next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos_ids or None, pad_token_id=pad_id)
    outputs: list[Optional[list[int]]] = [None] * len(inputs)
    order = np.argsort([-len(x) for x in inputs], kind="stable")
    bar = tqdm(total=len(inputs), unit="q", desc=desc, dynamic_ncols=True, disable=not progress)
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        for lo in range(0, len(order), batch_size):
            batch = order[lo: lo + batch_size]
            width = max(len(inputs[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, width - len(inputs[i]):] = torch.as_tensor(inputs[i])
                mask[r, width - len(inputs[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            new = out[:, width:].tolist()
            for r, i in enumerate(batch):
                seq = new[r]
                stop = next((t for t, tok in enumerate(seq) if tok in eos_ids), None)
                outputs[i] = seq[: stop + 1] if stop is not None else seq
            bar.update(len(batch))
    finally:
        model.generation_config = saved
        bar.close()
    return outputs


@torch.inference_mode()
def span_logprobs(model, sequences: list[list[int]], spans: list[tuple[int, int]], pad_id: int,
                  batch_size: int = 16, device=None) -> list[float]:
    """sum_{p in [lo, hi)} log P(sequences[i][p] | sequences[i][:p]) per sequence, from one teacher-forced
    pass (right-padded; the output head runs only at the positions needed). spans: [(lo, hi)], 1 <= lo < hi."""
    from first_kd.models import head_logits, last_hidden_states

    device = device or next(model.parameters()).device
    totals = [0.0] * len(sequences)
    for lo in range(0, len(sequences), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(sequences))))
        width = max(len(sequences[i]) for i in idx)
        tokens = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            tokens[r, : len(sequences[i])] = torch.as_tensor(sequences[i], dtype=torch.long)
            mask[r, : len(sequences[i])] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        rows = torch.as_tensor([r for r, i in enumerate(idx) for _ in range(*spans[i])], device=device)
        cols = torch.as_tensor([p for i in idx for p in range(*spans[i])], device=device)
        hidden = last_hidden_states(model, tokens, mask)[rows, cols - 1]
        logp = torch.log_softmax(head_logits(model, hidden), dim=-1)
        picked = logp.gather(1, tokens[rows, cols][:, None])[:, 0].double()
        sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows, picked)
        for r, i in enumerate(idx):
            totals[i] = float(sums[r])
    return totals


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def mode_inputs(prompt_ids: list[list[int]], mode: str, tokenizer, slow_marker: str, fast_marker: str,
                separator: str) -> tuple[list[list[int]], list[int]]:
    """(model inputs, forced ids): the prompt ids + the marker prefix ids of a forced mode; auto forces nothing."""
    from first_kd.data.traces import marker_prefix_ids

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    forced = [] if mode == "auto" else \
        marker_prefix_ids(tokenizer, slow_marker if mode == "slow" else fast_marker, separator)
    return [list(p) + forced for p in prompt_ids], forced


def evaluate_generation(model, tokenizer, questions, modes: list[str], extractor: str, slow_marker: str = "[slow]",
                        fast_marker: str = "[fast]", separator: str = "\n", max_new_tokens: int = 256,
                        batch_size: int = 16, n_bins: int = 10, chat_template: bool = False, device=None,
                        progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate and score every question in every mode (see the module docstring).

    questions: first_kd.data.rationale.Question list, each with a gold answer.
    Returns ({mode: metrics}, prediction lines: mode by mode, questions in data order within a mode).
    """
    from first_kd.data.rationale import compile_extractor, find_answer

    pattern = compile_extractor(extractor)
    missing = [q.id for q in questions if q.gold is None]
    if missing:
        raise FirstKDError(f"{len(missing)} question(s) have no gold answer (first: id {missing[0]}): evaluating "
                           f"generated answers needs them; point --answer-field at the answers")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = stop_token_ids(model, tokenizer)
    prompts = encode_prompts(tokenizer, [q.prompt for q in questions], chat_template)
    summaries, lines = {}, []
    for mode in modes:
        inputs, forced = mode_inputs(prompts, mode, tokenizer, slow_marker, fast_marker, separator)
        generated = greedy_generate(model, inputs, pad_id, eos_ids, max_new_tokens, batch_size, device, progress,
                                    desc=f"generating ({mode})")
        mode_lines, to_score = [], []
        for q, x, gen in zip(questions, inputs, generated):
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
        summaries[mode] = summarize(mode_lines, n_bins)
        summaries[mode]["mode"] = mode
        lines += mode_lines
    return summaries, lines


def generate_and_score(cfg) -> tuple[dict, list[dict]]:
    """The measuring part of `first-kd evaluate --modes` (cfg: first_kd.commands.evaluate.EvaluateConfig): load the
    model, the tokenizer and the questions, generate and score every mode. Returns (the metrics.json body
    without the label: the first mode's metrics at the top level, every mode's under "modes"; the
    prediction lines). `first_kd.commands.evaluate.run_evaluate` labels and writes them."""
    from accelerate import PartialState

    from first_kd.data import _unescape, load_records
    from first_kd.models import load_model, load_tokenizer, resolve_dtype
    from first_kd.data.rationale import load_questions

    device = PartialState(cpu=not torch.cuda.is_available()).device
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
    questions = load_questions(load_records(cfg), cfg)
    model = load_model(cfg.model, dtype, device, cfg.revision, cfg.trust_remote_code)
    summaries, lines = evaluate_generation(
        model, tokenizer, questions, cfg.modes, cfg.extractor, cfg.slow_marker, cfg.fast_marker,
        _unescape(cfg.step_separator), cfg.max_new_tokens, cfg.batch_size, cfg.n_bins, cfg.chat_template, device)
    summary = {**summaries[cfg.modes[0]], "model": cfg.model, "data": cfg.data, "split": cfg.split,
               "source": "model", "dtype": str(dtype).replace("torch.", ""), "temperature": None,
               "extractor": cfg.extractor, "cue": cfg.cue, "max_new_tokens": cfg.max_new_tokens, "modes": summaries}
    return summary, lines
