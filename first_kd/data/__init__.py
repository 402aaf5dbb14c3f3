"""Records in, token ids out: load a dataset, tell its layout, render prompts, tokenize with an exact
prompt/target boundary.

Two layouts are understood:

  * "mcqa": a question with lettered options. The prompt lists the options as "A. text" lines and
    the target is ONE token, the gold option's letter, so the next-token distribution at the last
    prompt position is the model's answer distribution over the letters. By default (--answer-prefix
    auto) a letter's token is the one that follows the prompt when the letter is written after it as
    running text (' A' after "Answer:" for byte-level BPE, '▁A' for SentencePiece, whose ' A' on its
    own would be two tokens); a literal prefix instead tokenizes prefix + letter on its own.
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
from typing import Any, Literal, NamedTuple, Optional

from first_kd.config import option
from first_kd.errors import FirstKDError

FORMATS = ("mcqa", "prompt-response")
LETTERS = string.ascii_uppercase
AUTO_PREFIX = "auto"  # --answer-prefix value: find each letter's token after the prompt, in context
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
        AUTO_PREFIX, help="MCQA target: 'auto' = the answer letter's token as it follows the prompt in running "
                          "text (' A' after 'Answer:', 'A' after a newline), found by tokenizing prompt + answer; "
                          "any other value is a literal prefix tokenized with the letter on its own (' ' = ' A', "
                          "'' = 'A'); either way each letter must be one token")
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
                   "answer and is always kept (see first_kd/data/traces.py)")
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
    from first_kd.data.traces import parse_levels

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
    verbosity = datasets.logging.get_verbosity()
    # A reader failure is reported below on one line; datasets would log its own second line first.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        # The json builder reads both JSON lines and a single top-level JSON list.
        return datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as e:  # any reader failure is a problem with the file, reported on one line
        if _file_is_empty(path, loader):
            raise _no_records(path) from None
        bad = first_bad_json_line(path) if loader == "json" else None
        if bad is not None:
            raise FirstKDError(f"--data {path}: could not read it as json: line {bad[0]} is {bad[1]}; fix or "
                               f"remove that line") from None
        raise FirstKDError(f"--data {path}: could not read it as {loader} ({_root_message(e)}); "
                           f"fix the file or convert it to jsonl") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def first_bad_json_line(path: Path) -> Optional[tuple[int, str]]:
    """(line number, what is wrong) of the first line of a JSON file that is not what the json reader
    takes, or None when none is found. A file opening with '[' is one JSON document (a list of objects);
    anything else is JSON lines, one object per non-blank line."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return e.lineno, f"not valid JSON ({e.msg} at column {e.colno})"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return number, f"not valid JSON ({e.msg} at column {e.colno})"
        if not isinstance(value, dict):
            return number, f"a JSON {type(value).__name__}, not an object (JSON lines hold one object per line)"
    return None


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


class _Row(NamedTuple):
    """One output row: the record it comes from, its id, prompt text, response text (None for MCQA: the
    target is the gold letter's token), gold option index (-1 without), option count (0 without) and the
    trace marker that opens its target (None without)."""

    rec: _Record
    id: str
    prompt: str
    response: Optional[str]
    gold: int
    n: int
    marker: Optional[str]


def _response_field(cfg: DataConfig, layout: Optional[str]) -> str:
    return cfg.output_field if layout == "alpaca" else cfg.response_field


def _fingerprint(ds, tokenizer, cfg: DataConfig) -> str:
    """A cheap deterministic fingerprint, so `datasets` need not pickle the tokenizer to hash map()."""
    parts = [getattr(ds, "_fingerprint", ""), json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str),
             type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer)),
             str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


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
        self.found: dict[str, tuple[int, _Record]] = {}  # letter -> (token id, the record it was found after)

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

    def _one_token(self, rec: _Record, letter: str, ids: Optional[list[int]], prompt: str) -> int:
        if ids is None:
            raise rec.fail(f"the answer {answer_text(prompt, letter)!r} merges with the end of the prompt "
                           f"({prompt[-12:]!r}) into other tokens with this tokenizer, so it has no token of its "
                           f"own; end --template differently (e.g. without trailing whitespace) or set "
                           f"--answer-prefix (e.g. ' ' or '')")
        if len(ids) != 1:
            raise rec.fail(f"option letter {letter!r} after the prompt is {len(ids)} tokens ({ids}) with this "
                           f"tokenizer, not one; set --answer-prefix (e.g. ' ' or '') or change how --template ends")
        return ids[0]

    def _alone(self, rec: _Record, letter: str) -> int:
        ids = self.tokenizer.encode(self.prefix + letter, add_special_tokens=False)
        if len(ids) != 1:
            raise rec.fail(f"option letter {letter!r} with --answer-prefix {self.prefix!r} is {len(ids)} tokens "
                           f"({ids}) with this tokenizer, not one; use --answer-prefix {AUTO_PREFIX} (the default: "
                           f"the letter's token after the prompt) or another prefix (e.g. ' ' or '')")
        return ids[0]


def _response_rows(rec: _Record, prompt: str, response: str, cfg: DataConfig, layout: str,
                   levels: Optional[list[float]]) -> list[_Row]:
    """The prompt-response rows of one record: itself, or with --trace-levels one Dualformer variant per level,
    whose response is the text after `marker + separator` (the marker's ids are added apart)."""
    if levels is None:
        return [_Row(rec, rec.id, prompt, response, -1, 0, None)]
    from first_kd.data.traces import marker_for, trace_variants

    separator = _unescape(cfg.step_separator)
    try:
        variants = trace_variants(rec.id, response, levels, cfg.trace_seed, separator,
                                  cfg.slow_marker, cfg.fast_marker)
    except ValueError as e:
        raise rec.fail(f"field '{_response_field(cfg, layout)}': {e}; fix the record or drop --trace-levels") from None
    rows = []
    for level, (vid, text) in zip(levels, variants):
        marker = marker_for(level, cfg.slow_marker, cfg.fast_marker)
        rows.append(_Row(rec, vid, prompt, text[len(marker + separator):], -1, 0, marker))
    return rows


def _assemble(rows: list[_Row], prompt_ids, target_ids, cfg: DataConfig, layout: Optional[str]) -> dict:
    """The map() output columns of a batch: prompt ids then target ids, cut to --max-length."""
    out = {"id": [], "input_ids": [], "target_start": [], "answer_index": [], "n_choices": [], "truncated": []}
    for row, p_ids, t_ids in zip(rows, prompt_ids, target_ids):
        room = cfg.max_length - len(p_ids)
        if room < 1:
            raise row.rec.fail(f"prompt is {len(p_ids)} tokens, leaving nothing of --max-length "
                               f"{cfg.max_length} for the target; raise --max-length or shorten the prompt")
        if not t_ids:
            raise row.rec.fail(f"empty response in field '{_response_field(cfg, layout)}' "
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
            raise FirstKDError(f"record {i} (id {rid}): id repeats record {seen[rid]}; ids must be unique: "
                               f"fix the data or set --id-field to a unique field (or a missing one to "
                               f"number records)")
        seen[rid] = i


def tokenize_records(ds, tokenizer, cfg: DataConfig):
    """Turn raw records into model inputs with an exact prompt/target boundary.

    With `cfg.trace_levels` set (prompt-response data only), each record becomes one row per level: its
    Dualformer variants (first_kd.data.traces), ids f"{id}#full", f"{id}#drop50", f"{id}#fast" ..., the prompt
    unchanged. A variant's target ids are the ids of `marker + separator` followed by the ids of the rest,
    each tokenized on its own: exactly the ids `first-kd evaluate --modes slow,fast` forces after the
    prompt, which tokenizing the joined text would not guarantee (BPE merges across the seam).

    Returns:
        (dataset, info). The dataset has one row per record (per variant with trace levels) with columns
          id (str), input_ids (list[int]: prompt ids then target ids), target_start (int: index of the
          first target token), answer_index (int: gold option, -1 for prompt-response), n_choices
          (int: 0 for prompt-response), truncated (bool: the response was cut to fit max_length).
        info: {"format", "choice_token_ids" (the token id of each letter A.. up to the most options of any
          record, as it follows the prompt (--answer-prefix auto) or of answer_prefix + letter; [] for
          prompt-response), "choice_labels" (those letters), "n_records" (rows), "n_source_records" (records
          read), "n_truncated", "trace_levels" (the drop levels, or None)}.
    """
    import datasets

    fmt = detect_format(ds, cfg)
    if fmt not in FORMATS:
        raise FirstKDError(f"unknown --format {fmt!r}: use auto, mcqa or prompt-response")
    render_prompts(tokenizer, [], cfg.chat_template)  # fails early when --chat-template has no template
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
    letters = _LetterTokens(tokenizer, cfg.answer_prefix)
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    levels = _trace_levels(cfg)
    marker_ids = {}
    if levels is not None:
        from first_kd.data.traces import marker_prefix_ids

        if fmt == "mcqa":
            raise FirstKDError("--trace-levels drops reasoning steps of prompt-response data, but this data is "
                               "multiple-choice (one answer token): drop --trace-levels or use rationale data "
                               "(first-kd generate + filter)")
        marker_ids = {m: marker_prefix_ids(tokenizer, m, _unescape(cfg.step_separator))
                      for m in (cfg.slow_marker, cfg.fast_marker)}

    def encode_batch(batch: dict, indices: list[int]) -> dict:
        rows = []
        for j, i in enumerate(indices):
            rid = str(batch[cfg.id_field][j]) if has_ids and batch[cfg.id_field][j] is not None else str(i)
            rec = _Record(i, rid, {k: batch[k][j] for k in batch})
            if fmt == "mcqa":
                prompt, gold, n = _mcqa_example(rec, cfg, answer_field)
                rows.append(_Row(rec, rec.id, prompt, None, gold, n, None))
            else:
                prompt, response = _prompt_response_example(rec, cfg, layout, templates)
                rows += _response_rows(rec, prompt, response, cfg, layout, levels)
        prompts = render_prompts(tokenizer, [row.prompt for row in rows], cfg.chat_template)
        prompt_ids = tokenizer(prompts, add_special_tokens=not cfg.chat_template)["input_ids"]
        if fmt == "mcqa":
            target_ids = letters.targets(rows, prompts)
        else:
            responses = tokenizer([row.response for row in rows], add_special_tokens=False)["input_ids"]
            target_ids = [marker_ids.get(row.marker, []) + ids + eos for row, ids in zip(rows, responses)]
        return _assemble(rows, prompt_ids, target_ids, cfg, layout)

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

    _check_unique_ids(out["id"], len(levels) if levels is not None else 1)
    max_choices = max(out["n_choices"]) if fmt == "mcqa" else 0
    info = {
        "format": fmt,
        "choice_token_ids": letters.ids(max_choices),
        "choice_labels": list(LETTERS[:max_choices]),
        "n_records": len(out),
        "n_source_records": len(ds),
        "n_truncated": int(sum(out["truncated"])),
        "trace_levels": levels,
    }
    return out, info


def prepare_dataset(cfg: DataConfig, tokenizer):
    """`load_records` then `tokenize_records`: (tokenized dataset, info)."""
    return tokenize_records(load_records(cfg), tokenizer, cfg)
