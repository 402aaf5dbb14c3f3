"""The data options (`DataConfig`: where records come from and how they become prompts and targets), their
validation, and how their typed values are read: a template typed on a command line (`unescape`,
`check_template`), the drop levels of --trace-levels (`drop_levels`) and the spec and level probabilities of
--trace-spec / --trace-probs (`trace_spec_of`).

Every command that reads records (cache, distill, evaluate, generate, filter) takes these options, so they
and their checks are written once here; first_kd.data.rationale extends them for rationale prompts.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Literal, Optional

from first_kd.config import option
from first_kd.data.trace_spec import load_trace_spec
from first_kd.data.traces import TraceSpec, parse_levels, parse_probs
from first_kd.errors import FirstKDError

AUTO_PREFIX = "auto"  # --answer-prefix value: find each letter's token after the prompt, in context


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
    trace_spec: Optional[str] = option(
        None, help="drop parts of each response's trace by structure, Dualformer-style: a built-in spec (astar: "
                   "A* create/close clauses then plan lines; steps: reasoning lines then the answer line) or a "
                   "YAML file (format: first_kd/data/trace_spec.py). Each example's level is drawn again every "
                   "epoch, so it is for `distill --data` only (cache and distill --store need fixed variants: "
                   "--trace-levels)")
    trace_probs: Optional[str] = option(
        None, help="the --trace-spec levels' probabilities, comma-separated in the spec's order (one per level, "
                   ">= 0, summing to 1), e.g. 0.5,0.1,0.1,0.1,0.2; default: the spec's own")
    trace_seed: int = option(0, help="seed of which steps each variant drops (--trace-levels), and of each example's "
                                     "level and drops in each epoch (--trace-spec)")
    step_separator: str = option("\n", help="what separates the steps of a response (a typed \\n is a newline)")
    slow_marker: str = option("[slow]", help="control marker opening a response that shows (part of) its trace")
    fast_marker: str = option("[fast]", help="control marker opening a response that gives the answer only")

    def require_data(self) -> None:
        """One-line error for a command that cannot run without --data."""
        if not self.data:
            raise FirstKDError("missing --data (a jsonl/json/parquet/csv file, a save_to_disk dir or a hub dataset)")

    def refuse_trace_spec(self, why: str, fix: str) -> None:
        """One-line error when --trace-spec is set where targets must be fixed token sequences (a store's):
        `why` says where and why, `fix` what to do (--trace-levels materialises fixed variants)."""
        if self.trace_spec:
            raise FirstKDError(f"--trace-spec draws each example's trace again every epoch, but {why}: {fix}")

    def validate(self) -> None:
        if self.max_length < 2:
            raise FirstKDError(f"--max-length must be at least 2 (prompt + target); got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise FirstKDError(f"--limit must be a positive number of records; got {self.limit}")
        check_template("--template", self.template, required=("question", "options"))
        check_template("--prompt-template", self.prompt_template, required=("instruction",))
        _check_trace_options(self)


def unescape(template: str) -> str:
    """A template typed on a command line holds a literal backslash-n where a newline is meant."""
    return template.replace("\\n", "\n").replace("\\t", "\t")


def check_template(flag: str, template: str, required: tuple[str, ...]) -> None:
    """A one-line FirstKDError naming `flag` unless `template` is a format string with named fields only,
    `required` among them."""
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


def drop_levels(cfg: DataConfig) -> Optional[list[float]]:
    """The drop levels of --trace-levels (None when unset); a bad list is a one-line FirstKDError."""
    if cfg.trace_levels is None:
        return None
    try:
        return parse_levels(cfg.trace_levels)
    except ValueError as e:
        raise FirstKDError(f"--trace-levels {cfg.trace_levels!r}: {e}") from None


def trace_spec_of(cfg: DataConfig) -> Optional[tuple[TraceSpec, list[float]]]:
    """(the spec of --trace-spec, its level probabilities: --trace-probs or the spec's own), or None without
    --trace-spec; a bad spec or list is a one-line FirstKDError."""
    if not cfg.trace_spec:
        if cfg.trace_probs is not None:
            raise FirstKDError("--trace-probs sets the probabilities of --trace-spec levels: add --trace-spec "
                               "(astar, steps or a YAML file) or drop --trace-probs")
        return None
    spec = load_trace_spec(cfg.trace_spec)
    if cfg.trace_probs is None:
        return spec, spec.default_probs
    try:
        return spec, parse_probs(cfg.trace_probs, spec.level_names)
    except ValueError as e:
        raise FirstKDError(f"--trace-probs {cfg.trace_probs!r}: {e}") from None


def _check_trace_options(cfg: DataConfig) -> None:
    if cfg.trace_spec and cfg.trace_levels is not None:
        raise FirstKDError("--trace-spec and --trace-levels both drop trace steps: give one (--trace-spec draws a "
                           "level per example every epoch; --trace-levels materialises fixed variants)")
    drop_levels(cfg)
    found = trace_spec_of(cfg)
    if found is not None and found[0].separator is not None and found[0].separator != unescape(cfg.step_separator):
        raise FirstKDError(f"trace spec {found[0].name} separates steps with {found[0].separator!r} but "
                           f"--step-separator is {unescape(cfg.step_separator)!r}: drop --step-separator (evaluate "
                           f"--modes forces the marker + --step-separator, so the two must agree)")
    if not unescape(cfg.step_separator):
        raise FirstKDError("--step-separator is empty: give what separates the steps (default a newline, typed \\n)")
    for flag, marker in (("--slow-marker", cfg.slow_marker), ("--fast-marker", cfg.fast_marker)):
        if not marker.strip():
            raise FirstKDError(f"{flag} is empty: give a control marker such as [slow] / [fast]")
    # A completion is told slow or fast by the marker it starts with, so neither may start the other.
    if cfg.slow_marker.startswith(cfg.fast_marker) or cfg.fast_marker.startswith(cfg.slow_marker):
        raise FirstKDError(f"--slow-marker {cfg.slow_marker!r} and --fast-marker {cfg.fast_marker!r} must differ "
                           f"and neither may begin with the other; pick two distinct markers")
