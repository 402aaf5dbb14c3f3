"""Records in, token ids out: load a dataset, tell its layout, render prompts, tokenize with an exact
prompt/target boundary.

Two layouts are understood:

  * "mcqa": a question with lettered options. The prompt lists the options as "A. text" lines and
    the target is ONE token, `answer_prefix + letter` of the gold option, so the next-token
    distribution at the last prompt position is the model's answer distribution over the letters.
    Choices come as HF CommonsenseQA/ARC dicts ``{"label": [...], "text": [...]}``, a list of
    strings, a list of ``{"label", "text"}`` dicts, or a JSON list in a string (CSV). The answer is a
    label ("B"), a 0-based int index, a 0-based digit string, or the option's text.
  * "prompt-response": Alpaca (instruction / input / output) rendered with `prompt_template`, or a
    plain prompt / response pair whose prompt is used verbatim. The target is the response tokens
    (+ eos); a response longer than what `max_length` leaves is truncated and flagged.

The prompt is tokenized with the tokenizer's own special tokens (BOS for Llama-style tokenizers) and
the target without, then the two id lists are concatenated: that way `target_start` is exactly where
the target begins, which tokenizing the joined string would not guarantee (BPE merges across the
seam). Positions target_start-1 .. len-2 are the ones whose next-token predictions are the target.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from first_kd.config import option
from first_kd.errors import FirstKDError

FORMATS = ("mcqa", "prompt-response")
LETTERS = string.ascii_uppercase
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Suffixes that make a missing --data value read as a mistyped path rather than a hub dataset name.
_PATH_LIKE_SUFFIXES = set(FILE_LOADERS) | {".txt", ".tsv", ".arrow", ".gz", ".zst", ".xlsx", ".yaml", ".yml"}


@dataclass
class DataConfig:
    """Where the records come from and how they become prompts and targets."""

    data: Optional[str] = option(
        None, help="jsonl/json/parquet/csv file, a datasets.save_to_disk dir, or a hub dataset name")
    split: str = option(
        "train", help="split to use when the source holds several (hub dataset, DatasetDict dir)")
    format: Literal["auto", "mcqa", "prompt-response"] = option(
        "auto", help="record layout; auto detects it from the field names")
    id_field: str = option(
        "id", help="field holding a record id; when absent, ids are the record index")
    question_field: str = option("question", help="MCQA: field holding the question text")
    choices_field: str = option(
        "choices", help="MCQA: field holding the options ({label, text} dict or a list of strings)")
    answer_field: Optional[str] = option(
        None, help="MCQA: field holding the gold option (label, 0-based index or text); "
                   "default 'answerKey' when present, else 'answer'")
    instruction_field: str = option("instruction", help="Alpaca layout: instruction field")
    input_field: str = option("input", help="Alpaca layout: optional input field")
    output_field: str = option("output", help="Alpaca layout: response field")
    prompt_field: str = option("prompt", help="prompt/response layout: prompt field (used verbatim)")
    response_field: str = option("response", help="prompt/response layout: response field")
    template: str = option(
        "Question: {question}\n{options}\nAnswer:",
        help="MCQA prompt; {options} becomes 'A. text' lines; any record field may be named; "
             "a typed \\n is a newline")
    prompt_template: str = option(
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        help="Alpaca prompt (plain prompts are used verbatim); when a record's input is empty, the "
             "blank-line-separated block holding {input} is dropped; a typed \\n is a newline")
    answer_prefix: str = option(
        " ", help="MCQA target is answer_prefix + letter (default: one space); it must be one token "
                  "with the tokenizer")
    chat_template: bool = option(
        False, help="wrap the prompt as a user turn with the tokenizer's chat template")
    max_length: int = option(512, help="maximum tokens per example (prompt + target)")
    limit: Optional[int] = option(None, help="use only the first N records")
    add_eos: bool = option(
        True, help="end prompt-response targets with the tokenizer's eos token when it has one")
    # --- Dualformer-style trace dropping (prompt-response data whose response is steps, one per line) ---
    trace_levels: Optional[str] = option(
        None, help="materialise each response as seeded variants, one per drop level, e.g. '0,0.5,1': 0 = the "
                   "full trace, 0.5 = half its steps dropped, 1 = no trace (answer only); the last step is the "
                   "answer and is always kept (see first_kd/traces.py)")
    trace_seed: int = option(0, help="seed of which steps each variant drops")
    step_separator: str = option("\n", help="what separates the steps of a response (a typed \\n is a newline)")
    slow_marker: str = option("[slow]", help="control marker opening a response that shows (part of) its trace")
    fast_marker: str = option("[fast]", help="control marker opening a response that gives the answer only")

    def validate(self) -> None:
        if self.max_length < 2:
            raise FirstKDError(f"--max-length must be at least 2 (prompt + target); got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise FirstKDError(f"--limit must be a positive number of records; got {self.limit}")
        _check_template("--template", self.template, required=("question", "options"))
        _check_template("--prompt-template", self.prompt_template, required=("instruction",))
        _check_trace_options(self)


def _trace_levels(cfg: DataConfig) -> Optional[list[float]]:
    """The drop levels of --trace-levels (None when unset); a bad list is a one-line FirstKDError."""
    from first_kd.traces import parse_levels

    if cfg.trace_levels is None:
        return None
    try:
        return parse_levels(cfg.trace_levels)
    except ValueError as e:
        raise FirstKDError(f"--trace-levels {cfg.trace_levels!r}: {e}") from None


def _check_trace_options(cfg: DataConfig) -> None:
    _trace_levels(cfg)
    if not _unescape(cfg.step_separator):
        raise FirstKDError("--step-separator is empty: give what separates the steps (default a newline, typed \\n)")
    for flag, marker in (("--slow-marker", cfg.slow_marker), ("--fast-marker", cfg.fast_marker)):
        if not marker.strip():
            raise FirstKDError(f"{flag} is empty: give a control marker such as [slow] / [fast]")
    # A completion is told slow or fast by the marker it starts with, so neither may start the other.
    if cfg.slow_marker.startswith(cfg.fast_marker) or cfg.fast_marker.startswith(cfg.slow_marker):
        raise FirstKDError(f"--slow-marker {cfg.slow_marker!r} and --fast-marker {cfg.fast_marker!r} must differ "
                           f"and neither may begin with the other; pick two distinct markers")


def _unescape(template: str) -> str:
    """A template typed on a command line holds a literal backslash-n where a newline is meant."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def _check_template(flag: str, template: str, required: tuple[str, ...]) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise FirstKDError(f"{flag} is not a valid format string ({e}): write fields as {{name}} "
                           f"and literal braces as {{{{ }}}}") from None
    if "" in names or any(n.isdigit() for n in names):
        raise FirstKDError(f"{flag} has a positional {{}} field: name it, e.g. {{{required[0]}}}")
    missing = [n for n in required if n not in names]
    if missing:
        raise FirstKDError(f"{flag} must contain {', '.join('{' + n + '}' for n in missing)}")


# ----------------------------------------------------------------------------------------------
# Loading


def _root_message(exc: BaseException) -> str:
    """The innermost cause's first line: datasets wraps the useful message in generic ones."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _looks_like_path(name: str) -> bool:
    p = Path(name).expanduser()
    return (name.startswith((".", "/", "~")) or p.suffix.lower() in _PATH_LIKE_SUFFIXES
            or (len(p.parts) > 1 and Path(p.parts[0]).exists()))


def _no_records(source) -> FirstKDError:
    return FirstKDError(f"--data {source}: the dataset holds no records; point --data at non-empty "
                        f"data (or check --split)")


def _file_is_empty(path: Path, loader: str) -> bool:
    """Whether a file that `datasets` failed to read simply has no rows (it raises on those)."""
    try:
        if loader == "parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(str(path)).num_rows == 0
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if loader == "csv":
            return len(lines) <= 1  # a header and nothing else
        return "".join(lines).replace(" ", "") in ("", "[]")
    except Exception:
        return False


def _load_file(path: Path):
    import datasets

    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise FirstKDError(f"--data {path}: unknown file type '{path.suffix}'; use .jsonl, .json, "
                           f".parquet or .csv, or a datasets.save_to_disk directory")
    try:
        # The json builder reads both JSON lines and a single top-level JSON list.
        return datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as e:  # any reader failure is a problem with the file, reported on one line
        if _file_is_empty(path, loader):
            raise _no_records(path) from None
        raise FirstKDError(f"--data {path}: could not read it as {loader} ({_root_message(e)}); "
                           f"fix the file or convert it to jsonl") from None


def _load_dir(path: Path, split: str):
    import datasets

    source = path
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():  # a saved DatasetDict: load only the split asked for
        splits = json.loads(dict_file.read_text()).get("splits", [])
        if split not in splits:
            raise FirstKDError(f"--data {source}: no split '{split}'; set --split to one of {', '.join(splits)}")
        path = path / split
    state = path / "state.json"
    # `datasets` cannot load a saved dataset with no rows (it fails deep inside), so look first.
    if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
        raise _no_records(source)
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise FirstKDError(f"--data {source}: directory is not a datasets.save_to_disk folder; "
                           f"point --data at a data file or a saved dataset") from None
    except Exception as e:
        raise FirstKDError(f"--data {source}: could not load the saved dataset ({_root_message(e)}); "
                           f"save it again with save_to_disk") from None


def _load_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:
        raise FirstKDError(f"--data {name}: not a local path and loading it as a hub dataset "
                           f"(split '{split}') failed ({_root_message(e)}); check the name, the "
                           f"split and the network, or pass a local file") from None


def load_records(cfg: DataConfig):
    """Load the records named by `cfg.data` as a `datasets.Dataset` (first `cfg.limit` only).

    A file is read by its extension, a directory with `datasets.load_from_disk` (a DatasetDict gives
    `cfg.split`), and anything else that does not exist locally is tried as a hub dataset name.
    """
    if not cfg.data:
        raise FirstKDError("no data given: set --data to a jsonl/json/parquet/csv file, a saved "
                           "dataset directory or a hub dataset name")
    path = Path(cfg.data).expanduser()
    if path.is_dir():
        ds = _load_dir(path, cfg.split)
    elif path.is_file():
        ds = _load_file(path)
    elif _looks_like_path(cfg.data):
        raise FirstKDError(f"--data {cfg.data}: file not found; check the path")
    else:
        ds = _load_hub(cfg.data, cfg.split)
    if cfg.limit is not None and cfg.limit < len(ds):
        ds = ds.select(range(cfg.limit))
    if len(ds) == 0:
        raise _no_records(cfg.data)
    return ds


# ----------------------------------------------------------------------------------------------
# Layout


def _answer_field(columns, cfg: DataConfig) -> str:
    if cfg.answer_field:
        return cfg.answer_field
    return "answerKey" if "answerKey" in columns else "answer"


def _prompt_layout(columns, cfg: DataConfig) -> Optional[str]:
    """"alpaca" or "plain" for prompt-response data, None when neither pair of fields is there."""
    if cfg.instruction_field in columns and cfg.output_field in columns:
        return "alpaca"
    if cfg.prompt_field in columns and cfg.response_field in columns:
        return "plain"
    return None


def detect_format(ds, cfg: DataConfig) -> str:
    """"mcqa" or "prompt-response": `cfg.format` when forced, else told from the column names."""
    if cfg.format != "auto":
        return cfg.format
    columns = set(ds.column_names)
    is_mcqa = cfg.question_field in columns and cfg.choices_field in columns
    is_prompt = _prompt_layout(columns, cfg) is not None
    if is_mcqa and is_prompt:
        raise FirstKDError(f"the data has both MCQA fields ({cfg.question_field}, {cfg.choices_field}) "
                           f"and prompt-response fields: set --format mcqa or --format prompt-response")
    if is_mcqa:
        return "mcqa"
    if is_prompt:
        return "prompt-response"
    raise FirstKDError(
        f"cannot tell the data layout from its fields ({', '.join(ds.column_names)}): MCQA needs "
        f"'{cfg.question_field}' + '{cfg.choices_field}' (set --question-field/--choices-field), "
        f"prompt-response needs '{cfg.instruction_field}' + '{cfg.output_field}' "
        f"(--instruction-field/--output-field) or '{cfg.prompt_field}' + '{cfg.response_field}' "
        f"(--prompt-field/--response-field); or set --format")


# ----------------------------------------------------------------------------------------------
# Rendering one record (pure functions of the record; errors name the record)


class _Record:
    """One raw record with its index and id, so every error can name both."""

    def __init__(self, index: int, rid: str, values: dict):
        self.index, self.id, self.values = index, rid, values

    def fail(self, message: str) -> FirstKDError:
        return FirstKDError(f"record {self.index} (id {self.id}): {message}")

    def get(self, field: str, flag: str, required: bool = True) -> Any:
        value = self.values.get(field)
        if value is None and required:
            fields = ", ".join(k for k, v in self.values.items() if v is not None)
            raise self.fail(f"missing field '{field}' (fields: {fields}); fix the record or set {flag}")
        return value


def _parse_choices(rec: _Record, field: str) -> tuple[list[str], Optional[list[str]]]:
    """Option texts and their labels (None when the layout has no labels)."""
    value = rec.get(field, "--choices-field")
    if isinstance(value, str):
        try:  # CSV cannot hold a list: accept one written as JSON
            value = json.loads(value)
        except json.JSONDecodeError:
            raise rec.fail(f"field '{field}' is a string, not a list of options; write it as a "
                           f"JSON list or use jsonl/parquet") from None
    labels = None
    if isinstance(value, dict):
        texts, labels = value.get("text"), value.get("label")
        if texts is None:
            raise rec.fail(f"field '{field}' is a dict without a 'text' list; expected "
                           f"{{'label': [...], 'text': [...]}}")
        if labels is not None and len(labels) != len(texts):
            raise rec.fail(f"field '{field}' has {len(labels)} labels for {len(texts)} texts; fix the record")
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) and "text" in v for v in value):
            texts = [v["text"] for v in value]
            labels = [v.get("label") for v in value] if all(v.get("label") is not None for v in value) else None
        else:
            texts = list(value)
    else:
        raise rec.fail(f"field '{field}' is a {type(value).__name__}, not a list of options")
    if not texts:
        raise rec.fail(f"field '{field}' has no options; remove the record or fix --choices-field")
    if len(texts) > len(LETTERS):
        raise rec.fail(f"field '{field}' has {len(texts)} options; at most {len(LETTERS)} (A-Z) are supported")
    return [str(t) for t in texts], ([str(x) for x in labels] if labels is not None else None)


def _answer_index(answer: Any, texts: list[str], labels: Optional[list[str]]) -> Optional[int]:
    """Gold option index from a label, a 0-based index (int or digit string) or the option text."""
    n = len(texts)
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # CSV / pandas turn int columns with gaps into floats
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer if 0 <= answer < n else None
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    if labels is not None and text in labels:  # labels first: ARC labels some options "1", "2" ..
        return labels.index(text)
    if len(text) == 1 and text.upper() in LETTERS[:n]:
        return LETTERS.index(text.upper())
    if text.isdigit():
        return int(text) if int(text) < n else None
    if text in texts:
        return texts.index(text)
    return None


def _render(rec: _Record, template: str, flag: str, fields: dict) -> str:
    try:
        return template.format_map({**rec.values, **fields})
    except KeyError as e:
        raise rec.fail(f"{flag} names field {e} which the record lacks; fix the template") from None


def _drop_input_block(template: str) -> str:
    """`template` without the blank-line-separated block(s) that hold only the {input} field."""
    def only_input(block: str) -> bool:
        names = {n for _, n, _, _ in string.Formatter().parse(block) if n is not None}
        return names == {"input"}

    blocks = template.split("\n\n")
    kept = [b for b in blocks if not only_input(b)]
    return "\n\n".join(kept) if len(kept) < len(blocks) else template


def _mcqa_example(rec: _Record, cfg: DataConfig, answer_field: str) -> tuple[str, int, int]:
    """(prompt text, gold option index, number of options) of one MCQA record."""
    question = rec.get(cfg.question_field, "--question-field")
    if isinstance(question, dict) and "stem" in question:  # OpenBookQA / original ARC nesting
        question = question["stem"]
    texts, labels = _parse_choices(rec, cfg.choices_field)
    answer = rec.get(answer_field, "--answer-field")
    gold = _answer_index(answer, texts, labels)
    if gold is None:
        shown = ", ".join(labels) if labels is not None else f"A-{LETTERS[len(texts) - 1]} or 0-{len(texts) - 1}"
        raise rec.fail(f"answer {answer!r} in field '{answer_field}' is not among its {len(texts)} "
                       f"choices ({shown}); fix the record or set --answer-field")
    options = "\n".join(f"{LETTERS[i]}. {t}" for i, t in enumerate(texts))
    prompt = _render(rec, _unescape(cfg.template), "--template", {"question": str(question), "options": options})
    return prompt, gold, len(texts)


def _prompt_response_example(rec: _Record, cfg: DataConfig, layout: str, templates: dict) -> tuple[str, str]:
    """(prompt text, response text) of one prompt-response record."""
    if layout == "plain":
        return (str(rec.get(cfg.prompt_field, "--prompt-field")),
                str(rec.get(cfg.response_field, "--response-field")))
    instruction = str(rec.get(cfg.instruction_field, "--instruction-field"))
    extra = rec.get(cfg.input_field, "--input-field", required=False)
    extra = "" if extra is None else str(extra)
    response = str(rec.get(cfg.output_field, "--output-field"))
    if cfg.chat_template:
        # The chat template supplies the turn structure, so the Alpaca scaffolding would be noise.
        return (instruction + ("\n\n" + extra if extra.strip() else "")), response
    template = templates["with_input"] if extra.strip() else templates["without_input"]
    return _render(rec, template, "--prompt-template", {"instruction": instruction, "input": extra}), response


# ----------------------------------------------------------------------------------------------
# Tokenization


def _letter_token_ids(tokenizer, prefix: str) -> dict[str, list[int]]:
    return {L: tokenizer.encode(prefix + L, add_special_tokens=False) for L in LETTERS}


def _fingerprint(ds, tokenizer, cfg: DataConfig) -> str:
    """A cheap deterministic fingerprint, so `datasets` need not pickle the tokenizer to hash map()."""
    parts = [getattr(ds, "_fingerprint", ""), json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str),
             type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer)),
             str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool = False) -> list[list[int]]:
    """Prompt token ids, the one way every command builds them (training targets follow these ids, and
    generate / evaluate --modes continue them): with the tokenizer's special tokens, or, with
    `chat_template`, rendered as a user turn by the chat template, which writes its own special tokens
    (adding them again would double the BOS)."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise FirstKDError("--chat-template is set but this tokenizer has no chat template; "
                               "drop --chat-template or use a chat model's tokenizer")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in prompts]
    return tokenizer(prompts, add_special_tokens=not chat_template)["input_ids"]


def tokenize_records(ds, tokenizer, cfg: DataConfig):
    """Turn raw records into model inputs with an exact prompt/target boundary.

    With `cfg.trace_levels` set (prompt-response data only), each record becomes one row per level: its
    Dualformer variants (first_kd.traces), ids f"{id}#full", f"{id}#drop50", f"{id}#fast" ..., the prompt
    unchanged. A variant's target ids are the ids of `marker + separator` followed by the ids of the rest,
    each tokenized on its own: exactly the ids `first-kd evaluate --modes slow,fast` forces after the
    prompt, which tokenizing the joined text would not guarantee (BPE merges across the seam).

    Returns:
        (dataset, info). The dataset has one row per record (per variant with trace levels) with columns
          id (str), input_ids (list[int]: prompt ids then target ids), target_start (int: index of the
          first target token), answer_index (int: gold option, -1 for prompt-response), n_choices
          (int: 0 for prompt-response), truncated (bool: the response was cut to fit max_length).
        info: {"format", "choice_token_ids" (id of answer_prefix + letter for A.. up to the most
          options of any record; [] for prompt-response), "choice_labels" (those letters),
          "n_records" (rows), "n_source_records" (records read), "n_truncated",
          "trace_levels" (the drop levels, or None)}.
    """
    import datasets

    fmt = detect_format(ds, cfg)
    if fmt not in FORMATS:
        raise FirstKDError(f"unknown --format {fmt!r}: use auto, mcqa or prompt-response")
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise FirstKDError("--chat-template is set but this tokenizer has no chat template; "
                           "drop --chat-template or use a chat model's tokenizer")
    columns = ds.column_names
    has_ids = cfg.id_field in columns
    answer_field = _answer_field(columns, cfg)
    layout = _prompt_layout(set(columns), cfg) if fmt == "prompt-response" else None
    if fmt == "prompt-response" and layout is None:
        first_id = str(ds[0][cfg.id_field]) if has_ids else "0"
        raise FirstKDError(
            f"record 0 (id {first_id}): missing prompt-response fields (fields: {', '.join(columns)}); "
            f"set --instruction-field/--output-field or --prompt-field/--response-field")
    prompt_template = _unescape(cfg.prompt_template)
    templates = {"with_input": prompt_template, "without_input": _drop_input_block(prompt_template)}
    letter_ids = _letter_token_ids(tokenizer, cfg.answer_prefix) if fmt == "mcqa" else {}
    eos = tokenizer.eos_token_id if cfg.add_eos else None
    levels = _trace_levels(cfg)
    if levels is not None:
        from first_kd.traces import marker_for, marker_prefix_ids, trace_variants

        if fmt == "mcqa":
            raise FirstKDError("--trace-levels drops reasoning steps of prompt-response data, but this data is "
                               "multiple-choice (one answer token): drop --trace-levels or use rationale data "
                               "(first-kd generate + filter)")
        separator = _unescape(cfg.step_separator)
        marker_prefixes = {m: m + separator for m in (cfg.slow_marker, cfg.fast_marker)}
        marker_ids = {m: marker_prefix_ids(tokenizer, m, separator) for m in marker_prefixes}

    def encode_batch(batch: dict, indices: list[int]) -> dict:
        records = [
            _Record(i, str(batch[cfg.id_field][j]) if has_ids and batch[cfg.id_field][j] is not None else str(i),
                    {k: batch[k][j] for k in batch})
            for j, i in enumerate(indices)
        ]
        prompts, targets, golds, n_choices, row_records, row_ids, row_markers = [], [], [], [], [], [], []
        for rec in records:
            if levels is not None:
                prompt, response = _prompt_response_example(rec, cfg, layout, templates)
                try:
                    variants = trace_variants(rec.id, response, levels, cfg.trace_seed, separator,
                                              cfg.slow_marker, cfg.fast_marker)
                except ValueError as e:
                    raise rec.fail(f"field '{cfg.output_field if layout == 'alpaca' else cfg.response_field}': "
                                   f"{e}; fix the record or drop --trace-levels") from None
                for level, (vid, text) in zip(levels, variants):
                    marker = marker_for(level, cfg.slow_marker, cfg.fast_marker)
                    prompts.append(prompt)
                    targets.append(text[len(marker_prefixes[marker]):])
                    golds.append(-1)
                    n_choices.append(0)
                    row_records.append(rec)
                    row_ids.append(vid)
                    row_markers.append(marker)
                continue
            row_records.append(rec)
            row_ids.append(rec.id)
            row_markers.append(None)
            if fmt == "mcqa":
                prompt, gold, n = _mcqa_example(rec, cfg, answer_field)
                for letter in LETTERS[:n]:
                    if len(letter_ids[letter]) != 1:
                        raise rec.fail(
                            f"option letter {letter!r} with --answer-prefix {cfg.answer_prefix!r} is "
                            f"{len(letter_ids[letter])} tokens ({letter_ids[letter]}) with this tokenizer, "
                            f"not one; set --answer-prefix (e.g. ' ' or '')")
                targets.append(letter_ids[LETTERS[gold]])
            else:
                prompt, response = _prompt_response_example(rec, cfg, layout, templates)
                gold, n = -1, 0
                targets.append(response)
            prompts.append(prompt)
            golds.append(gold)
            n_choices.append(n)

        prompt_ids = encode_prompts(tokenizer, prompts, cfg.chat_template)
        if fmt == "prompt-response":
            target_ids = [(marker_ids[m] if m is not None else []) + ids + ([eos] if eos is not None else [])
                          for m, ids in zip(row_markers, tokenizer(targets, add_special_tokens=False)["input_ids"])]
        else:
            target_ids = targets

        out = {"id": [], "input_ids": [], "target_start": [], "answer_index": golds,
               "n_choices": n_choices, "truncated": []}
        for rec, rid, p_ids, t_ids in zip(row_records, row_ids, prompt_ids, target_ids):
            room = cfg.max_length - len(p_ids)
            if room < 1:
                raise rec.fail(f"prompt is {len(p_ids)} tokens, leaving nothing of --max-length "
                               f"{cfg.max_length} for the target; raise --max-length or shorten the prompt")
            if not t_ids:
                raise rec.fail(f"empty response in field '{cfg.output_field if layout == 'alpaca' else cfg.response_field}' "
                               f"and no eos to learn; remove the record or enable --add-eos")
            out["id"].append(rid)
            out["input_ids"].append(list(p_ids) + list(t_ids[:room]))
            out["target_start"].append(len(p_ids))
            out["truncated"].append(len(t_ids) > room)
        return out

    features = datasets.Features({
        "id": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "target_start": datasets.Value("int32"),
        "answer_index": datasets.Value("int32"),
        "n_choices": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
    })
    out = ds.map(encode_batch, with_indices=True, batched=True, batch_size=1000,
                 remove_columns=columns, features=features, keep_in_memory=True,
                 load_from_cache_file=False, new_fingerprint=_fingerprint(ds, tokenizer, cfg),
                 desc="tokenizing")

    ids = out["id"]
    seen: dict[str, int] = {}
    per_record = len(levels) if levels is not None else 1  # rows per record, in record order
    for row, rid in enumerate(ids):
        i = row // per_record
        if rid in seen:
            raise FirstKDError(f"record {i} (id {rid}): id repeats record {seen[rid]}; ids must be unique: "
                               f"fix the data or set --id-field to a unique field (or a missing one to "
                               f"number records)")
        seen[rid] = i

    max_choices = max(out["n_choices"]) if fmt == "mcqa" else 0
    labels = list(LETTERS[:max_choices])
    info = {
        "format": fmt,
        "choice_token_ids": [letter_ids[L][0] for L in labels],
        "choice_labels": labels,
        "n_records": len(out),
        "n_source_records": len(ds),
        "n_truncated": int(sum(out["truncated"])),
        "trace_levels": levels,
    }
    return out, info


def prepare_dataset(cfg: DataConfig, tokenizer):
    """`load_records` then `tokenize_records`: (tokenized dataset, info)."""
    return tokenize_records(load_records(cfg), tokenizer, cfg)
