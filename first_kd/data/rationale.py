"""Text conventions of teacher-written rationales: the question prompt with its reasoning cue, and
the answer extractor that reads the final answer out of a rationale.

`first-kd generate` (the teacher writes rationales), `first-kd filter` (compares extracted answers)
and `first-kd evaluate --modes` (the student writes them) all go through these functions, so a prompt
and an answer mean the same thing at every step.

Extractors
----------
A preset name or a regular expression. The answer is the named group `answer` (or the first group,
or the whole match) of the LAST match in the text: models restate the final answer at the end, and a
rationale may mention other candidates on the way. Presets:

  answer-is    "... the answer is X" (case-insensitive; X = the next word or number, optionally in
               parentheses)
  hashes       "#### N" (GSM8K)
  letter       an option letter after "answer is" / "answer:" ("(B)", "B.", "b")
  last-number  the last number in the text

Answers are normalised before they are compared: surrounding whitespace, quotes, parentheses and
trailing punctuation go; numbers lose thousands separators and a redundant ".0"; a single letter is
upper-cased (option letters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from first_kd.config import option
from first_kd.data.options import DataConfig, check_template, unescape
from first_kd.data.templates import (LETTERS, Record, answer_field, mcqa_example, option_lines, parse_choices,
                                     record_id, render, repeated_id_error)
from first_kd.errors import FirstKDError

EXTRACTORS = {
    "answer-is": r"(?i:the answer is)\s*:?\s*\(?[$£€]?(?P<answer>-?[\w][\w,.\-/]*?)\)?[.,;:!]?(?=\s|$)",
    "hashes": r"####\s*(?P<answer>-?[\d,]*\.?\d+)",
    "letter": r"(?i:answer is|answer:)\s*\(?(?P<answer>[A-Za-z])(?![A-Za-z])",
    "last-number": r"(?P<answer>-?\d[\d,]*(?:\.\d+)?)",
}
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")


def compile_extractor(extractor: str) -> re.Pattern:
    """A preset name or a regex -> compiled pattern; a bad regex is a FirstKDError naming the fix."""
    pattern = EXTRACTORS.get(extractor, extractor)
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise FirstKDError(f"--extractor {extractor!r} is neither a preset ({', '.join(EXTRACTORS)}) nor a valid "
                           f"regular expression ({e}); use a preset or fix the regex") from None
    return compiled


def normalize_answer(text: str) -> str:
    """Canonical form used to compare answers: see the module docstring."""
    previous = None
    while text != previous:  # quotes and punctuation nest either way round: '"Rome".' and '"Rome."'
        previous = text
        text = text.strip().strip("\"'`")
        if text and text[-1] in ".,;:!?" and not _NUMBER.fullmatch(text):
            text = text[:-1]
    if len(text) >= 2 and text[0] == "(" and text[-1] == ")":
        text = text[1:-1].strip()
    plain = text.replace(",", "")
    if _NUMBER.fullmatch(plain):
        if "." in plain:
            plain = plain.rstrip("0").rstrip(".")
        return str(int(plain)) if plain.lstrip("+-").isdigit() else plain
    if len(text) == 1 and text.isalpha():
        return text.upper()
    return text


def find_answer(text: str, extractor: str | re.Pattern) -> Optional[tuple[str, int, int]]:
    """(normalised answer, start, end) of the last match in `text`, or None when nothing matches.

    start/end are character offsets of the raw answer in `text` (the group span), so a caller can find
    the tokens that spell it.
    """
    pattern = extractor if isinstance(extractor, re.Pattern) else compile_extractor(extractor)
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return None
    if "answer" in pattern.groupindex:
        group = "answer"
    else:
        group = 1 if pattern.groups else 0
    if last.group(group) is None:
        return None
    answer = normalize_answer(last.group(group))
    return (answer, last.start(group), last.end(group)) if answer else None


def extract_answer(text: str, extractor: str | re.Pattern) -> Optional[str]:
    """The normalised final answer in `text`, or None."""
    found = find_answer(text, extractor)
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------
# Question prompts


@dataclass
class RationaleConfig(DataConfig):
    """How a question becomes a prompt for a rationale, and how its answer is read back."""

    cue: str = option("Let's think step by step.",
                      help="reasoning cue appended to every prompt (zero-shot CoT); '' for none")
    extractor: str = option("answer-is", help="answer extractor: a preset (answer-is, hashes, letter, "
                                              "last-number) or a regex whose group 'answer' is the answer")
    qa_template: str = option("Question: {question}\nAnswer:",
                              help="prompt of question/answer records (no options); any record field may be "
                                   "named; a typed \\n is a newline")

    def validate(self) -> None:
        super().validate()
        compile_extractor(self.extractor)
        check_template("--qa-template", self.qa_template, required=("question",))


@dataclass
class Question:
    """One question ready for a rationale: `prompt` ends with the cue; `gold` is normalised (None when the
    data has no answer). MCQA questions keep their options so they can be shuffled (perturbation)."""

    id: str
    prompt: str
    gold: Optional[str]
    options: Optional[list[str]] = None
    gold_index: Optional[int] = None


def with_cue(prompt: str, cue: str) -> str:
    """`prompt` followed by the reasoning cue (one space between them unless the prompt ends in
    whitespace). A prompt that already ends with the cue is returned as it is, so the output of
    `generate`/`filter` (prompts that carry their cue) can be evaluated or regenerated with the same cue."""
    if not cue or prompt.rstrip().endswith(cue.strip()):
        return prompt
    return prompt + cue if prompt.endswith(("\n", " ")) else prompt + " " + cue


def _gold_text(value: Any, extractor: re.Pattern) -> Optional[str]:
    """A gold answer field: a full worked solution ("... #### 72") is read with the extractor, a bare
    answer ("72") is normalised as it is."""
    if value is None:
        return None
    text = str(value)
    found = find_answer(text, extractor)
    return found[0] if found else (normalize_answer(text) or None)


def mcqa_prompt(question: str, options: list[str], template: str, extra: Optional[dict] = None) -> str:
    """The MCQA prompt of first_kd.data's layout ("A. text" lines), for options in the given order."""
    return unescape(template).format_map({**(extra or {}), "question": question, "options": option_lines(options)})


def load_questions(ds, cfg: RationaleConfig) -> list[Question]:
    """Questions of a loaded dataset, in order.

    Layouts: MCQA (question + choices: first_kd.data's template; gold = option letter), question/answer
    (question, no choices: `qa_template`; gold = the answer field, read with the extractor when it holds
    a worked solution) and prompt (the prompt field verbatim; gold from the answer field if present, else
    extracted from the response field if present).
    """
    columns = set(ds.column_names)
    extractor = compile_extractor(cfg.extractor)
    gold_field = answer_field(columns, cfg)
    if cfg.question_field in columns and cfg.choices_field in columns and cfg.format != "prompt-response":
        layout = "mcqa"
    elif cfg.question_field in columns:
        layout = "qa"
    elif cfg.prompt_field in columns:
        layout = "prompt"
    else:
        raise FirstKDError(f"cannot find questions in the data (fields: {', '.join(sorted(columns))}): set "
                           f"--question-field (with --choices-field for multiple choice) or --prompt-field")
    questions, seen = [], {}
    for i, values in enumerate(ds):
        rid = record_id(values, i, cfg.id_field)
        if rid in seen:
            raise repeated_id_error(i, rid, seen[rid])
        seen[rid] = i
        rec = Record(i, rid, values)
        if layout == "mcqa":
            prompt, gold_index, n = mcqa_example(rec, cfg, gold_field)
            texts, _ = parse_choices(rec, cfg.choices_field)
            q = Question(rid, with_cue(prompt, cfg.cue), LETTERS[gold_index], options=texts, gold_index=gold_index)
        elif layout == "qa":
            question = rec.get(cfg.question_field, "--question-field")
            prompt = render(rec, unescape(cfg.qa_template), "--qa-template", {"question": str(question)})
            q = Question(rid, with_cue(prompt, cfg.cue), _gold_text(values.get(gold_field), extractor))
        else:
            prompt = str(rec.get(cfg.prompt_field, "--prompt-field"))
            gold = values.get(gold_field)
            if gold is None and values.get(cfg.response_field) is not None:
                gold = extract_answer(str(values[cfg.response_field]), extractor)
            q = Question(rid, with_cue(prompt, cfg.cue), _gold_text(gold, extractor))
        questions.append(q)
    return questions
