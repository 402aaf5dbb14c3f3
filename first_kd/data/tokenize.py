"""Token ids out: prompts rendered and encoded the one way every command does it, each option letter's token
as it follows the prompt, and `tokenize_records`, which turns loaded records into model inputs with an
exact prompt/target boundary.

The prompt is tokenized with the tokenizer's own special tokens (BOS for Llama-style tokenizers) and
the target without, then the two id lists are concatenated: that way `target_start` is exactly where
the target begins, which tokenizing the joined string would not guarantee (BPE merges across the
seam). Positions target_start-1 .. len-2 are the ones whose next-token predictions are the target.

An MCQA target is ONE token, the gold option's letter, so the next-token distribution at the last prompt
position is the model's answer distribution over the letters. By default (--answer-prefix auto) a letter's
token is the one that follows the prompt when the letter is written after it as running text (' A' after
"Answer:" for byte-level BPE, '▁A' for SentencePiece, whose ' A' on its own would be two tokens); a literal
prefix instead tokenizes prefix + letter on its own. A prompt-response target is the response tokens
(+ eos); a response longer than what --max-length leaves is truncated and flagged. With --trace-spec the target
is drawn again every epoch (`TraceTargets`): the dataset holds the epoch-0 draw and the response as written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NamedTuple, Optional

from first_kd.data.options import AUTO_PREFIX, DataConfig, drop_levels, trace_spec_of, unescape
from first_kd.data.records import FORMATS, detect_format, load_records
from first_kd.data.templates import (LETTERS, Record, answer_field, mcqa_example, prompt_layout,
                                     prompt_response_example, prompt_templates, record_id, repeated_id_error,
                                     response_field)
from first_kd.data.trace_spec import spec_record
from first_kd.data.traces import marker_for, marker_prefix_ids, spec_variant, trace_variants
from first_kd.errors import FirstKDError


def render_prompts(tokenizer, prompts: list[str], chat_template: bool = False) -> list[str]:
    """Each prompt as the text the model reads: itself, or with `chat_template` rendered as a user turn by the
    tokenizer's chat template, up to where the assistant's answer starts."""
    if not chat_template:
        return list(prompts)
    if not getattr(tokenizer, "chat_template", None):
        raise FirstKDError("--chat-template is set but this tokenizer has no chat template; "
                           "drop --chat-template or use a chat model's tokenizer")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in prompts]


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool = False) -> list[list[int]]:
    """Prompt token ids, the one way every command builds them (training targets follow these ids, and
    generate / evaluate --modes continue them): with the tokenizer's special tokens, or, with
    `chat_template`, rendered as a user turn by the chat template, which writes its own special tokens
    (adding them again would double the BOS)."""
    rendered = render_prompts(tokenizer, prompts, chat_template)
    return tokenizer(rendered, add_special_tokens=not chat_template)["input_ids"]


def answer_text(prompt: str, letter: str) -> str:
    """How an option letter follows `prompt` in running text: after a space ("Answer: A"), or directly when the
    prompt already ends with whitespace (a newline, a chat template's assistant turn)."""
    return letter if prompt[-1:].isspace() else " " + letter


def tokens_after(tokenizer, prompts: list[str], answers: list[str]) -> list[Optional[list[int]]]:
    """For each (prompt, answer): the token ids that follow the prompt's own tokens when prompt + answer is
    tokenized as one text (no special tokens), or None when the prompt's tokens are not a prefix of that (the
    tokenizer joined the end of the prompt and the answer into other tokens)."""
    texts = list(prompts) + [p + a for p, a in zip(prompts, answers)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    alone, joined = ids[:len(prompts)], ids[len(prompts):]
    return [list(j[len(a):]) if list(j[:len(a)]) == list(a) else None for a, j in zip(alone, joined)]


class _LetterTokens:
    """The one token id of each option letter, found when a record first needs the letter and the same for
    every record after.

    --answer-prefix auto: the token that follows the record's prompt when the letter is appended as running
    text (`answer_text`, `tokens_after`): ' A' after 'Answer:' for byte-level BPE (GPT-2, Llama-3, Qwen) and
    '▁A' for SentencePiece (Llama-2, Mistral, Gemma), whose ' A' on its own is two tokens ('▁', '▁A'). Every
    record's gold letter is found after its own prompt, so a record whose prompt ends differently is caught.
    A literal prefix: prefix + letter tokenized on its own.
    """

    def __init__(self, tokenizer, prefix: str):
        self.tokenizer, self.prefix = tokenizer, prefix
        self.found: dict[str, tuple[int, Record]] = {}  # letter -> (token id, the record it was found after)

    def ids(self, n: int) -> list[int]:
        return [self.found[letter][0] for letter in LETTERS[:n]]

    def targets(self, rows: list[_Row], prompts: list[str]) -> list[list[int]]:
        """Each MCQA row's target ids ([its gold letter's token]) after its rendered prompt; a letter that is
        not one token is a one-line error naming the first record that needs it."""
        if self.prefix != AUTO_PREFIX:
            for row in rows:
                for letter in LETTERS[:row.n]:
                    if letter not in self.found:
                        self.found[letter] = (self._alone(row.rec, letter), row.rec)
            return [[self.found[LETTERS[row.gold]][0]] for row in rows]
        asks, asked = [], set()  # (row index, letter): each gold letter, and each letter where first needed
        for i, row in enumerate(rows):
            new = [L for L in LETTERS[:row.n] if L not in self.found and L not in asked]
            asked.update(new)
            asks += [(i, letter) for letter in dict.fromkeys([LETTERS[row.gold], *new])]
        after = tokens_after(self.tokenizer, [prompts[i] for i, _ in asks],
                             [answer_text(prompts[i], letter) for i, letter in asks])
        for (i, letter), ids in zip(asks, after):
            rec = rows[i].rec
            token = self._one_token(rec, letter, ids, prompts[i])
            first = self.found.setdefault(letter, (token, rec))
            if first[0] != token:
                raise rec.fail(f"option letter {letter!r} is token {token} after this prompt but token {first[0]} "
                               f"after the prompt of record {first[1].index} (id {first[1].id}); end every prompt "
                               f"the same way (--template) or set --answer-prefix (e.g. ' ' or '')")
        return [[self.found[LETTERS[row.gold]][0]] for row in rows]

    def _one_token(self, rec: Record, letter: str, ids: Optional[list[int]], prompt: str) -> int:
        if ids is None:
            raise rec.fail(f"the answer {answer_text(prompt, letter)!r} merges with the end of the prompt "
                           f"({prompt[-12:]!r}) into other tokens with this tokenizer, so it has no token of its "
                           f"own; end --template differently (e.g. without trailing whitespace) or set "
                           f"--answer-prefix (e.g. ' ' or '')")
        if len(ids) != 1:
            raise rec.fail(f"option letter {letter!r} after the prompt is {len(ids)} tokens ({ids}) with this "
                           f"tokenizer, not one; set --answer-prefix (e.g. ' ' or '') or change how --template ends")
        return ids[0]

    def _alone(self, rec: Record, letter: str) -> int:
        ids = self.tokenizer.encode(self.prefix + letter, add_special_tokens=False)
        if len(ids) != 1:
            raise rec.fail(f"option letter {letter!r} with --answer-prefix {self.prefix!r} is {len(ids)} tokens "
                           f"({ids}) with this tokenizer, not one; use --answer-prefix {AUTO_PREFIX} (the default: "
                           f"the letter's token after the prompt) or another prefix (e.g. ' ' or '')")
        return ids[0]


class TraceTargets:
    """The targets of --trace-spec, drawn again for every (example, epoch): the level and the random parts of its
    operations are a pure function of (--trace-seed, epoch, record id) (first_kd.data.traces.spec_variant), and
    the target is the ids of `marker + separator`, tokenized on their own exactly as for --trace-levels (what
    `evaluate --modes slow,fast` forces), then the ids of the kept steps joined by the separator, then eos.

    `tokenize_records` writes each record's epoch-0 draw (one row per record, its id the record's) and keeps the
    response as written in a column `response`; training (first_kd.training.DataExamples) asks `input_ids` for
    the draw of the epoch at hand, so the prompt is tokenized once and only the target each time."""

    def __init__(self, tokenizer, cfg: DataConfig):
        found = trace_spec_of(cfg)
        if found is None:
            raise FirstKDError("TraceTargets needs --trace-spec")
        self.spec, self.probs = found
        self.tokenizer, self.seed, self.max_length = tokenizer, cfg.trace_seed, cfg.max_length
        self.sep = unescape(cfg.step_separator)
        self.slow_marker, self.fast_marker = cfg.slow_marker, cfg.fast_marker
        self.marker_ids = {m: marker_prefix_ids(tokenizer, m, self.sep) for m in (cfg.slow_marker, cfg.fast_marker)}
        self.eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
        self.record = spec_record(self.spec, self.probs)

    def variant(self, rid: str, response: str, epoch: int) -> tuple[str, str, str]:
        """(level name, marker, the text after `marker + separator`) of record `rid` in `epoch`. Raises ValueError
        for a response the spec refuses (empty, or a step no type matches)."""
        level, kept = spec_variant(self.spec, self.probs, rid, response, self.seed, epoch, self.sep)
        return level.name, self.fast_marker if self.spec.is_fast(level) else self.slow_marker, self.sep.join(kept)

    def target_ids(self, rid: str, response: str, epoch: int) -> list[int]:
        """Marker ids + the variant's ids + eos, uncut."""
        _, marker, text = self.variant(rid, response, epoch)
        return self.marker_ids[marker] + list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + self.eos

    def input_ids(self, prompt_ids, rid: str, response: str, epoch: int) -> list[int]:
        """`prompt_ids` then the target of `epoch`, cut to --max-length (as `tokenize_records` cuts them)."""
        room = self.max_length - len(prompt_ids)
        return list(prompt_ids) + self.target_ids(rid, response, epoch)[:max(room, 0)]


class _Row(NamedTuple):
    """One output row: the record it comes from, its id, prompt text, response text (None for MCQA: the
    target is the gold letter's token), gold option index (-1 without), option count (0 without), the
    trace marker that opens its target (None without) and, with --trace-spec, the response as written."""

    rec: Record
    id: str
    prompt: str
    response: Optional[str]
    gold: int
    n: int
    marker: Optional[str]
    source: Optional[str] = None


def _response_rows(rec: Record, prompt: str, response: str, cfg: DataConfig, layout: str,
                   levels: Optional[list[float]], trace: Optional[TraceTargets] = None) -> list[_Row]:
    """The prompt-response rows of one record: itself, with --trace-levels one Dualformer variant per level, or
    with --trace-spec its epoch-0 draw; a variant's response is the text after `marker + separator` (the
    marker's ids are added apart)."""
    if trace is not None:
        try:
            _, marker, text = trace.variant(rec.id, response, 0)
        except ValueError as e:
            raise rec.fail(f"field '{response_field(cfg, layout)}': {e}; fix the record or the trace spec "
                           f"{trace.spec.name}") from None
        return [_Row(rec, rec.id, prompt, text, -1, 0, marker, response)]
    if levels is None:
        return [_Row(rec, rec.id, prompt, response, -1, 0, None)]
    separator = unescape(cfg.step_separator)
    try:
        variants = trace_variants(rec.id, response, levels, cfg.trace_seed, separator,
                                  cfg.slow_marker, cfg.fast_marker)
    except ValueError as e:
        raise rec.fail(f"field '{response_field(cfg, layout)}': {e}; fix the record or drop --trace-levels") from None
    rows = []
    for level, (vid, text) in zip(levels, variants):
        marker = marker_for(level, cfg.slow_marker, cfg.fast_marker)
        rows.append(_Row(rec, vid, prompt, text[len(marker + separator):], -1, 0, marker))
    return rows


def _assemble(rows: list[_Row], prompt_ids, target_ids, cfg: DataConfig, layout: Optional[str]) -> dict:
    """The map() output columns of a batch: prompt ids then target ids, cut to --max-length (and with
    --trace-spec the response as written)."""
    out = {"id": [], "input_ids": [], "target_start": [], "answer_index": [], "n_choices": [], "truncated": []}
    if rows and rows[0].source is not None:
        out["response"] = [row.source for row in rows]
    for row, p_ids, t_ids in zip(rows, prompt_ids, target_ids):
        room = cfg.max_length - len(p_ids)
        if room < 1:
            raise row.rec.fail(f"prompt is {len(p_ids)} tokens, leaving nothing of --max-length "
                               f"{cfg.max_length} for the target; raise --max-length or shorten the prompt")
        if not t_ids:
            raise row.rec.fail(f"empty response in field '{response_field(cfg, layout)}' "
                               f"and no eos to learn; remove the record or enable --add-eos")
        out["id"].append(row.id)
        out["input_ids"].append(list(p_ids) + list(t_ids[:room]))
        out["target_start"].append(len(p_ids))
        out["answer_index"].append(row.gold)
        out["n_choices"].append(row.n)
        out["truncated"].append(len(t_ids) > room)
    return out


def _check_unique_ids(ids, per_record: int) -> None:
    """One-line error for the first row id that repeats; rows come `per_record` to a record, in record order."""
    seen: dict[str, int] = {}
    for row, rid in enumerate(ids):
        i = row // per_record
        if rid in seen:
            raise repeated_id_error(i, rid, seen[rid])
        seen[rid] = i


def _fingerprint(ds, tokenizer, cfg: DataConfig) -> str:
    """A cheap deterministic fingerprint, so `datasets` need not pickle the tokenizer to hash map()."""
    parts = [getattr(ds, "_fingerprint", ""), json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str),
             type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer)),
             str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]




class _Encoder:
    """The map() function of `tokenize_records`: turns one batch of records into output rows. What holds for
    the whole dataset (its format and layout, the templates, the letter tokens, eos, the trace levels and
    their markers' ids) is settled once, here, before the first batch, so a dataset-wide problem is one error
    before any record is read."""

    def __init__(self, ds, tokenizer, cfg: DataConfig):
        fmt = detect_format(ds, cfg)
        if fmt not in FORMATS:
            raise FirstKDError(f"unknown --format {fmt!r}: use auto, mcqa or prompt-response")
        render_prompts(tokenizer, [], cfg.chat_template)  # fails early when --chat-template has no template
        columns = ds.column_names
        layout = prompt_layout(set(columns), cfg) if fmt == "prompt-response" else None
        if fmt == "prompt-response" and layout is None:
            first_id = str(ds[0][cfg.id_field]) if cfg.id_field in columns else "0"
            raise FirstKDError(
                f"record 0 (id {first_id}): missing prompt-response fields (fields: {', '.join(columns)}); "
                f"set --instruction-field/--output-field or --prompt-field/--response-field")
        self.tokenizer, self.cfg, self.format, self.layout = tokenizer, cfg, fmt, layout
        self.answer_field = answer_field(columns, cfg)
        self.templates = prompt_templates(cfg)
        self.letters = _LetterTokens(tokenizer, cfg.answer_prefix)
        self.eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
        self.levels = drop_levels(cfg)
        self.trace = TraceTargets(tokenizer, cfg) if cfg.trace_spec else None
        self.marker_ids: dict[str, list[int]] = {}
        if self.levels is not None or self.trace is not None:
            flag = "--trace-levels" if self.trace is None else "--trace-spec"
            if fmt == "mcqa":
                raise FirstKDError(f"{flag} drops reasoning steps of prompt-response data, but this data "
                                   f"is multiple-choice (one answer token): drop {flag} or use rationale "
                                   f"data (first-kd generate + filter)")
            self.marker_ids = {m: marker_prefix_ids(tokenizer, m, unescape(cfg.step_separator))
                               for m in (cfg.slow_marker, cfg.fast_marker)}

    def rows(self, batch: dict, indices: list[int]) -> list[_Row]:
        """The rows of a batch of records (several per record with trace levels), in record order."""
        cfg, rows = self.cfg, []
        for j, i in enumerate(indices):
            values = {k: batch[k][j] for k in batch}
            rec = Record(i, record_id(values, i, cfg.id_field), values)
            if self.format == "mcqa":
                prompt, gold, n = mcqa_example(rec, cfg, self.answer_field)
                rows.append(_Row(rec, rec.id, prompt, None, gold, n, None))
            else:
                prompt, response = prompt_response_example(rec, cfg, self.layout, self.templates)
                rows += _response_rows(rec, prompt, response, cfg, self.layout, self.levels, self.trace)
        return rows

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        rows = self.rows(batch, indices)
        prompts = render_prompts(self.tokenizer, [row.prompt for row in rows], self.cfg.chat_template)
        prompt_ids = self.tokenizer(prompts, add_special_tokens=not self.cfg.chat_template)["input_ids"]
        if self.format == "mcqa":
            target_ids = self.letters.targets(rows, prompts)
        else:
            responses = self.tokenizer([row.response for row in rows], add_special_tokens=False)["input_ids"]
            target_ids = [self.marker_ids.get(row.marker, []) + ids + self.eos for row, ids in zip(rows, responses)]
        return _assemble(rows, prompt_ids, target_ids, self.cfg, self.layout)


def tokenize_records(ds, tokenizer, cfg: DataConfig):
    """Turn raw records into model inputs with an exact prompt/target boundary.

    With `cfg.trace_levels` set (prompt-response data only), each record becomes one row per level: its
    Dualformer variants (first_kd.data.traces), ids f"{id}#full", f"{id}#drop50", f"{id}#fast" ..., the prompt
    unchanged. A variant's target ids are the ids of `marker + separator` followed by the ids of the rest,
    each tokenized on its own: exactly the ids `first-kd evaluate --modes slow,fast` forces after the
    prompt, which tokenizing the joined text would not guarantee (BPE merges across the seam).
    With `cfg.trace_spec` set, each record is one row holding its epoch-0 draw (`TraceTargets`), its id the
    record's, and a column `response` with the response as written, from which training draws other epochs.

    Returns:
        (dataset, info). The dataset has one row per record (per variant with trace levels) with columns
          id (str), input_ids (list[int]: prompt ids then target ids), target_start (int: index of the
          first target token), answer_index (int: gold option, -1 for prompt-response), n_choices
          (int: 0 for prompt-response), truncated (bool: the response was cut to fit max_length).
        info: {"format", "choice_token_ids" (the token id of each letter A.. up to the most options of any
          record, as it follows the prompt (--answer-prefix auto) or of answer_prefix + letter; [] for
          prompt-response), "choice_labels" (those letters), "n_records" (rows), "n_source_records" (records
          read), "n_truncated", "trace_levels" (the drop levels, or None), "trace_spec" (name, sha256, level
          names and probabilities of --trace-spec, or None)}.
    """
    import datasets

    encoder = _Encoder(ds, tokenizer, cfg)
    features = datasets.Features({
        "id": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "target_start": datasets.Value("int32"),
        "answer_index": datasets.Value("int32"),
        "n_choices": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        **({"response": datasets.Value("string")} if encoder.trace is not None else {}),
    })
    out = ds.map(encoder, with_indices=True, batched=True, batch_size=1000,
                 remove_columns=ds.column_names, features=features, keep_in_memory=True,
                 load_from_cache_file=False, new_fingerprint=_fingerprint(ds, tokenizer, cfg),
                 desc="tokenizing")

    _check_unique_ids(out["id"], len(encoder.levels) if encoder.levels is not None else 1)
    max_choices = max(out["n_choices"]) if encoder.format == "mcqa" else 0
    info = {
        "format": encoder.format,
        "choice_token_ids": encoder.letters.ids(max_choices),
        "choice_labels": list(LETTERS[:max_choices]),
        "n_records": len(out),
        "n_source_records": len(ds),
        "n_truncated": int(sum(out["truncated"])),
        "trace_levels": encoder.levels,
        "trace_spec": encoder.trace.record if encoder.trace is not None else None,
    }
    return out, info


def prepare_dataset(cfg: DataConfig, tokenizer):
    """`load_records` then `tokenize_records`: (tokenized dataset, info)."""
    return tokenize_records(load_records(cfg), tokenizer, cfg)


def data_fingerprint(tokenized) -> str:
    """sha256 of a tokenized dataset's content: exactly what a model will see (ids, token ids) and where its
    targets are (target_start). Stores record it, so the same data is recognised whatever file it came from."""
    h = hashlib.sha256()
    table = tokenized.data
    for name in ("id", "input_ids", "target_start"):
        col = table.column(name).combine_chunks()
        for buf in col.buffers():
            if buf is not None:
                h.update(memoryview(buf))
    return h.hexdigest()
