"""A model writing text: greedy and sampled decoding, where a generated answer stops, and the log-probability
of the tokens that spell an answer.

One `model.generate` call is `generate_ids`: token-id inputs left-padded (`batching.pad_left`), a generation
configuration made of this call's arguments only (the model's own generation_config, a vendor's top_k or
repetition penalty, is set aside for the call), each row cut after its first stop id. On top of it:
  * `greedy_generate`: argmax continuations of many inputs, in length-sorted batches (`first-kd evaluate
    --modes`);
  * `generate_texts`: continuations of prompt texts, greedy or sampled (temperature, top-p), with a token
    budget per row, decoded by `decode_generated` (`first-kd generate`).
Stop ids are `first_kd.models.stop_token_ids` (the tokenizer's eos and the model's generation eos ids).

Scoring what was written: `answer_token_span` / `decoded_token_ends` find the generated tokens whose text
overlaps an answer's characters, and `span_logprobs` sums their log-probabilities in one teacher-forced pass.
`mode_inputs` builds the inputs of a forced reasoning mode (the prompt followed by a [slow] / [fast] marker);
`marker_probabilities` and `choose_modes` are auto mode's decision: the model's own probability of each marker
after the prompt, and a seeded draw between them per question.

Why auto mode draws the marker instead of taking the argmax: a dual-mode student is trained on levels drawn
independently of the problem (first_kd.data.traces), so what it learns for the first target token is
P(fast marker | prompt) ~ the share of fast levels, the same for every prompt. Greedy decoding then picks the
same marker for nearly every problem (whichever share is a hair larger): the reasoning demo's dual student
(seed 0), trained 50/50, put P(slow) between 0.481 and 0.490 on all 500 test questions, so greedy went fast
on every one and auto scored as its fast mode (0.680, against 1.000 slow; sampled, 0.824).
Drawing the marker from those probabilities is the model's choice at temperature 1 for the first decision
(Dualformer's auto mode samples its control token), made per question; the rest is greedy as in the forced
modes, so an auto answer equals the forced-mode answer of the mode it chose.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from first_kd.batching import length_batches, pad_left, pad_right
from first_kd.data import encode_prompts
from first_kd.models import head_logits, last_hidden_states

# Reasoning modes of `first-kd evaluate --modes`: a forced [slow] or [fast] marker, or the model's own choice.
MODES = ("slow", "fast", "auto")
# Auto mode draws between the markers only when the model puts at least this much mass on the two together;
# below it the model was not trained on them and writes its answer from the prompt alone.
MARKER_MASS = 0.5


# ----------------------------------------------------------------------------------------------
# Generating
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def plain_generation(model) -> Iterator[None]:
    """Within the block the model's generation_config is blank: generate() fills every option a call leaves
    unset from it (a vendor's top_k, repetition penalty ...), so blanking it makes the call's own options the
    whole definition of the decoding."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def cut_at_stop(ids: Sequence[int], stop_ids) -> list[int]:
    """`ids` up to and including the first stop id (generate pads the rows that finished early)."""
    ids = list(ids)
    stop = next((j for j, t in enumerate(ids) if t in stop_ids), None)
    return ids if stop is None else ids[: stop + 1]


@torch.inference_mode()
def generate_ids(model, inputs: Sequence[Sequence[int]], pad_id: int, stop_ids, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, device=None) -> list[list[int]]:
    """One generate call: the continuation of each of `inputs` (token id lists), up to and including its
    first stop id when one is reached, at most `max_new_tokens` tokens.

    temperature 0 is greedy (argmax) decoding; above 0 tokens are sampled from softmax(logits / temperature)
    restricted to the top-p nucleus (top_p 1 = the whole vocabulary: no hidden top-k), with torch's global
    random state. Rows are left-padded with `pad_id`, so every row's continuation starts at the same column.
    """
    from transformers import GenerationConfig

    device = device or next(model.parameters()).device
    stop_ids = set(stop_ids)
    ids, mask = pad_left(inputs, pad_id, device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=sorted(stop_ids) or None,
                              pad_token_id=pad_id, **sampling)
    with plain_generation(model):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [cut_at_stop(row, stop_ids) for row in out[:, ids.shape[1]:].tolist()]


def greedy_generate(model, inputs: list[list[int]], pad_id: int, stop_ids: list[int], max_new_tokens: int,
                    batch_size: int = 16, device=None, progress: bool = True,
                    desc: str = "generating") -> list[list[int]]:
    """Greedy continuations of `inputs` (token id lists), up to and including the first stop id (when
    reached), in data order. Batches of `batch_size` inputs of similar length (`batching.length_batches`),
    one `generate_ids` call each."""
    outputs: list[Optional[list[int]]] = [None] * len(inputs)
    bar = tqdm(total=len(inputs), unit="q", desc=desc, dynamic_ncols=True, disable=not progress)
    try:
        for batch in length_batches([len(x) for x in inputs], batch_size):
            new = generate_ids(model, [inputs[i] for i in batch], pad_id, stop_ids, max_new_tokens, device=device)
            for i, seq in zip(batch, new):
                outputs[i] = seq
            bar.update(len(batch))
    finally:
        bar.close()
    return outputs


def decode_generated(ids: Sequence[int], stop_ids, tokenizer) -> tuple[str, int, bool]:
    """(text, tokens generated incl. the stop id, finished) of one row of generated ids.

    The row is cut after its first stop id (generate pads finished rows); the text skips special tokens,
    keeps leading whitespace (it is appended to the prompt at cache time) and drops trailing whitespace.
    """
    ids = list(ids)
    end = next((j for j, t in enumerate(ids) if t in stop_ids), None)
    kept = ids if end is None else ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.rstrip(), len(ids) if end is None else end + 1, end is not None


def generate_texts(model, tokenizer, prompts: list[str], stop_ids, budgets: Sequence[int], temperature: float = 0.0,
                   top_p: float = 1.0, chat_template: bool = False) -> list[tuple[str, int, bool]]:
    """Continuations of prompt texts: a list of (text, n_tokens, finished) (`decode_generated`).

    Prompts are tokenized by `first_kd.data.encode_prompts`, as every command tokenizes them. `budgets[i]` is
    the most tokens row i may generate. Rows with the same budget share one `generate_ids` call, in order of
    first appearance, so a padded batch never runs past any row's room; when every row has the same budget
    this is one call.
    """
    budgets = list(budgets)
    results: list = [None] * len(prompts)
    for budget in dict.fromkeys(budgets):
        rows = [i for i, b in enumerate(budgets) if b == budget]
        inputs = encode_prompts(tokenizer, [prompts[i] for i in rows], chat_template)
        new = generate_ids(model, inputs, tokenizer.pad_token_id, stop_ids, budget, temperature, top_p)
        for i, ids in zip(rows, new):
            results[i] = decode_generated(ids, stop_ids, tokenizer)
    return results


# ----------------------------------------------------------------------------------------------
# Forced reasoning modes
# ----------------------------------------------------------------------------------------------


def mode_inputs(prompt_ids: list[list[int]], mode: str, tokenizer, slow_marker: str, fast_marker: str,
                separator: str) -> tuple[list[list[int]], list[int]]:
    """(model inputs, forced ids) of a reasoning mode: the prompt ids followed by the ids of `marker +
    separator` (tokenized on their own exactly as `first_kd.data.traces.marker_prefix_ids` makes them for
    training) for slow / fast; auto forces nothing."""
    from first_kd.data.traces import marker_prefix_ids

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    forced = [] if mode == "auto" else \
        marker_prefix_ids(tokenizer, slow_marker if mode == "slow" else fast_marker, separator)
    return [list(p) + forced for p in prompt_ids], forced


def marker_probabilities(model, prompt_ids: list[list[int]], slow_ids: list[int], fast_ids: list[int], pad_id: int,
                         batch_size: int = 16, device=None) -> np.ndarray:
    """[n, 2] float64: P(slow_ids | prompt), P(fast_ids | prompt) of each prompt (the whole marker prefix, so
    markers that share their first tokens are told apart), from teacher-forced passes."""
    n = len(prompt_ids)
    sequences = [list(p) + slow_ids for p in prompt_ids] + [list(p) + fast_ids for p in prompt_ids]
    spans = [(len(p), len(p) + len(slow_ids)) for p in prompt_ids] + [(len(p), len(p) + len(fast_ids))
                                                                       for p in prompt_ids]
    logps = np.asarray(span_logprobs(model, sequences, spans, pad_id, batch_size, device), dtype=np.float64)
    return np.exp(logps).reshape(2, n).T


def choose_modes(probabilities: np.ndarray, keys: Sequence[str], seed: int, sample: bool = True
                 ) -> list[Optional[str]]:
    """Auto mode's decision per question from `marker_probabilities` rows: "slow" with probability
    p_slow / (p_slow + p_fast), drawn by random.Random(f"{seed}:{key}") (the same question gets the same draw
    whatever else is evaluated), or the larger of the two with sample=False; None when p_slow + p_fast <
    MARKER_MASS (a model not trained on the markers)."""
    out: list[Optional[str]] = []
    for (p_slow, p_fast), key in zip(probabilities, keys):
        mass = p_slow + p_fast
        if mass < MARKER_MASS:
            out.append(None)
        elif sample:
            out.append("slow" if random.Random(f"{seed}:{key}").random() < p_slow / mass else "fast")
        else:
            out.append("slow" if p_slow >= p_fast else "fast")
    return out


# ----------------------------------------------------------------------------------------------
# The tokens of an answer and their log-probability
# ----------------------------------------------------------------------------------------------


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


@torch.inference_mode()
def span_logprobs(model, sequences: list[list[int]], spans: list[tuple[int, int]], pad_id: int,
                  batch_size: int = 16, device=None) -> list[float]:
    """sum_{p in [lo, hi)} log P(sequences[i][p] | sequences[i][:p]) per sequence, from one teacher-forced
    pass (right-padded; the output head runs only at the positions needed). spans: [(lo, hi)], 1 <= lo < hi."""
    device = device or next(model.parameters()).device
    totals = [0.0] * len(sequences)
    for lo in range(0, len(sequences), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(sequences))))
        tokens, mask = pad_right([sequences[i] for i in idx], pad_id, device)
        rows = torch.as_tensor([r for r, i in enumerate(idx) for _ in range(*spans[i])], device=device)
        cols = torch.as_tensor([p for i in idx for p in range(*spans[i])], device=device)
        hidden = last_hidden_states(model, tokens, mask)[rows, cols - 1]
        logp = torch.log_softmax(head_logits(model, hidden), dim=-1)
        picked = logp.gather(1, tokens[rows, cols][:, None])[:, 0].double()
        sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows, picked)
        for r, i in enumerate(idx):
            totals[i] = float(sums[r])
    return totals
