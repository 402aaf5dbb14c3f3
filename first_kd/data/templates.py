"""Record shapes: what one raw record means and the prompt text it renders to.

  * multiple choice ("mcqa"): a question, its options (HF CommonsenseQA/ARC dicts ``{"label": [...],
    "text": [...]}``, a list of strings, a list of ``{"label", "text"}`` dicts, or a JSON list in a string
    (CSV)) and a gold answer (a label "B", a 0-based int index, a 0-based digit string, or the option's
    text). The prompt is --template with {options} as "A. text" lines (`option_lines`).
  * prompt-response: Alpaca (instruction / input / output, rendered with --prompt-template, whose {input}
    block is dropped when the input is empty) or a plain prompt / response pair (the prompt verbatim).

These are pure functions of one record (`Record`: its values, index and id), and every error names the
record it comes from. Tokenizing the text is first_kd.data.tokenize's job.
"""

from __future__ import annotations

import json
import string
from typing import Any, Optional

from first_kd.data.options import DataConfig, unescape
from first_kd.errors import FirstKDError

LETTERS = string.ascii_uppercase


class Record:
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


def record_id(values: dict, index: int, id_field: str) -> str:
    """A record's id: its `id_field` (--id-field) value as text, or its index when it has none."""
    value = values.get(id_field)
    return str(value) if value is not None else str(index)


def repeated_id_error(index: int, rid: str, first: int) -> FirstKDError:
    """The one-line error for record `index` whose id `rid` is already record `first`'s."""
    return FirstKDError(f"record {index} (id {rid}): id repeats record {first}; ids must be unique: fix the data "
                        f"or set --id-field to a unique field (or a missing one to number records)")


def answer_field(columns, cfg: DataConfig) -> str:
    """The field holding the gold answer: --answer-field, else 'answerKey' when present, else 'answer'."""
    if cfg.answer_field:
        return cfg.answer_field
    return "answerKey" if "answerKey" in columns else "answer"


def prompt_layout(columns, cfg: DataConfig) -> Optional[str]:
    """"alpaca" or "plain" for prompt-response data, None when neither pair of fields is there."""
    if cfg.instruction_field in columns and cfg.output_field in columns:
        return "alpaca"
    if cfg.prompt_field in columns and cfg.response_field in columns:
        return "plain"
    return None


def response_field(cfg: DataConfig, layout: Optional[str]) -> str:
    """The field holding a prompt-response record's response in `layout`."""
    return cfg.output_field if layout == "alpaca" else cfg.response_field


def parse_choices(rec: Record, field: str) -> tuple[list[str], Optional[list[str]]]:
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


def answer_index(answer: Any, texts: list[str], labels: Optional[list[str]]) -> Optional[int]:
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


def option_lines(texts: list[str]) -> str:
    """What {options} becomes in an MCQA prompt: one "A. text" line per option, in the order given."""
    return "\n".join(f"{LETTERS[i]}. {t}" for i, t in enumerate(texts))


def render(rec: Record, template: str, flag: str, fields: dict) -> str:
    """`template` filled with the record's fields and `fields`; a field the record lacks names `flag`."""
    try:
        return template.format_map({**rec.values, **fields})
    except KeyError as e:
        raise rec.fail(f"{flag} names field {e} which the record lacks; fix the template") from None


def drop_input_block(template: str) -> str:
    """`template` without the blank-line-separated block(s) that hold only the {input} field."""
    def only_input(block: str) -> bool:
        names = {n for _, n, _, _ in string.Formatter().parse(block) if n is not None}
        return names == {"input"}

    blocks = template.split("\n\n")
    kept = [b for b in blocks if not only_input(b)]
    return "\n\n".join(kept) if len(kept) < len(blocks) else template


def mcqa_example(rec: Record, cfg: DataConfig, answer_field: str) -> tuple[str, int, int]:
    """(prompt text, gold option index, number of options) of one MCQA record."""
    question = rec.get(cfg.question_field, "--question-field")
    if isinstance(question, dict) and "stem" in question:  # OpenBookQA / original ARC nesting
        question = question["stem"]
    texts, labels = parse_choices(rec, cfg.choices_field)
    answer = rec.get(answer_field, "--answer-field")
    gold = answer_index(answer, texts, labels)
    if gold is None:
        shown = ", ".join(labels) if labels is not None else f"A-{LETTERS[len(texts) - 1]} or 0-{len(texts) - 1}"
        raise rec.fail(f"answer {answer!r} in field '{answer_field}' is not among its {len(texts)} "
                       f"choices ({shown}); fix the record or set --answer-field")
    fields = {"question": str(question), "options": option_lines(texts)}
    return render(rec, unescape(cfg.template), "--template", fields), gold, len(texts)


def prompt_templates(cfg: DataConfig) -> dict:
    """The Alpaca prompt templates of `cfg`: "with_input" (--prompt-template) and "without_input" (its {input}
    block dropped), for `prompt_response_example`."""
    template = unescape(cfg.prompt_template)
    return {"with_input": template, "without_input": drop_input_block(template)}


def prompt_response_example(rec: Record, cfg: DataConfig, layout: str, templates: dict) -> tuple[str, str]:
    """(prompt text, response text) of one prompt-response record (`templates`: `prompt_templates(cfg)`)."""
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
    return render(rec, template, "--prompt-template", {"instruction": instruction, "input": extra}), response
