"""first_kd.data.rationale: answer extractors on real-looking rationales, answer normalisation, and question
prompts (with their reasoning cue and gold answer) for every data layout."""

from __future__ import annotations

import datasets
import pytest

from first_kd.config import build
from first_kd.errors import FirstKDError
from first_kd.data.rationale import (EXTRACTORS, RationaleConfig, compile_extractor, extract_answer, find_answer,
                                load_questions, mcqa_prompt, normalize_answer, with_cue)

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
COT = ("Ann has 1,200 stickers and gives away 350, so 1,200 - 350 = 850 remain. "
       "Then she buys 2 packs of 25, which is 50 more. 850 + 50 = 900. So the answer is 900.")


@pytest.mark.parametrize("extractor, text, answer", [
    ("answer-is", COT, "900"),
    ("answer-is", "The answer is 1,234.", "1234"),  # thousands separator and the sentence's full stop go
    ("answer-is", "Adding them up, the answer is: 3.50", "3.5"),
    ("answer-is", "Let's see. The Answer Is (B).", "B"),
    ("answer-is", "At first the answer is 12 apples, but recounting, the answer is 14 apples.", "14"),
    ("hashes", GSM8K_SOLUTION, "72"),
    ("hashes", "so 1000 in total\n#### 1,000", "1000"),
    ("letter", "A bank stores money, so the answer is (b) because of that.", "B"),
    ("letter", "Between A and C, C is wrong.\nAnswer: D", "D"),
    ("last-number", "She has 3 apples and buys 12 more, 15 in total.", "15"),
    ("last-number", "It costs -4.50 dollars.", "-4.5"),
    ("last-number", "The city has 1,234,567 people.", "1234567"),
])
def test_presets_read_the_final_answer(extractor, text, answer):
    assert extract_answer(text, extractor) == answer


@pytest.mark.parametrize("extractor, text", [
    ("answer-is", "I am not sure about this one."),
    ("hashes", "The total is 72."),
    ("letter", "the answer is apple pie"),  # a word, not an option letter
    ("last-number", "no digits here"),
    ("answer-is", ""),
])
def test_no_match_is_none(extractor, text):
    assert find_answer(text, extractor) is None
    assert extract_answer(text, extractor) is None


def test_last_match_wins_and_span_points_at_the_raw_answer():
    text = "I think the answer is (B). Wait, no: the answer is C."
    answer, start, end = find_answer(text, "answer-is")
    assert answer == "C"
    assert text[start:end] == "C" and start > text.index("Wait")
    answer, start, end = find_answer("so the answer is 1,234.", "answer-is")
    assert answer == "1234" and "so the answer is 1,234."[start:end] == "1,234"
    text = "#### 5 was a typo\n#### 7"
    answer, start, end = find_answer(text, "hashes")
    assert answer == "7" and text[start:end] == "7"


def test_custom_regex_group_rules():
    text = "Final: [42] ... Final: [43]"
    assert extract_answer(text, r"Final: \[(?P<answer>\d+)\]") == "43"  # named group
    assert extract_answer(text, r"Final: \[(\d+)\]") == "43"  # first group
    assert extract_answer("result=17; result=18", r"\d+") == "18"  # whole match
    assert extract_answer("option (c)", r"\((?P<answer>[a-e])\)") == "C"  # normalised letter
    assert compile_extractor("answer-is").pattern == EXTRACTORS["answer-is"]


@pytest.mark.parametrize("bad", ["(unclosed", "[a-", "answer-iss(("])
def test_bad_regex_is_a_one_line_error_naming_the_fix(bad):
    with pytest.raises(FirstKDError, match="preset.*regular expression") as info:
        compile_extractor(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(FirstKDError, match="extractor"):
        build(RationaleConfig, {"extractor": bad})


@pytest.mark.parametrize("raw, norm", [
    (" 72. ", "72"), ("(B)", "B"), ("b", "B"), ("1,000", "1000"), ("3.50", "3.5"), ("2.0", "2"),
    ("+5", "5"), ("-0.50", "-0.5"), ("'yes'", "yes"), ("Paris!", "Paris"), ("(B).", "B"),
    ('  "Rome". ', "Rome"), ('"Rome."', "Rome"),
    ("007", "7"), ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm
    assert normalize_answer(norm) == norm  # idempotent


def test_equal_answers_written_differently_compare_equal():
    assert extract_answer("so the answer is 1,000.", "answer-is") == extract_answer("#### 1000", "hashes")
    assert extract_answer("the answer is (c)", "letter") == extract_answer("Answer: C", "letter")


@pytest.mark.parametrize("prompt, cue, joined", [
    ("Q: 2+2?\nA:", "Let's think step by step.", "Q: 2+2?\nA: Let's think step by step."),
    ("Q: 2+2?\nA:\n", "Let's think.", "Q: 2+2?\nA:\nLet's think."),
    ("Q: 2+2?\nA: ", "Let's think.", "Q: 2+2?\nA: Let's think."),
    ("Q: 2+2?\nA:", "", "Q: 2+2?\nA:"),
    # a prompt that carries its cue already (generate / filter output) is left as it is
    ("Q: 2+2?\nA: Let's think.", "Let's think.", "Q: 2+2?\nA: Let's think."),
])
def test_with_cue(prompt, cue, joined):
    assert with_cue(prompt, cue) == joined
    assert with_cue(joined, cue) == joined


def _questions(records, **options):
    return load_questions(datasets.Dataset.from_list(records), build(RationaleConfig, options))


def test_load_questions_mcqa():
    records = [
        {"id": "q0", "question": "Where would a cat sleep?",
         "choices": {"label": list("ABCDE"), "text": ["tree", "house", "river", "bank", "door"]}, "answerKey": "B"},
        {"id": "q1", "question": "Which is green?",
         "choices": {"label": ["1", "2", "3"], "text": ["tree", "light", "music"]}, "answerKey": "1"},
    ]
    q0, q1 = _questions(records)
    assert q0.prompt == ("Question: Where would a cat sleep?\nA. tree\nB. house\nC. river\nD. bank\nE. door\n"
                         "Answer: Let's think step by step.")
    assert (q0.id, q0.gold, q0.gold_index, q0.options) == ("q0", "B", 1, ["tree", "house", "river", "bank", "door"])
    assert (q1.gold, q1.gold_index) == ("A", 0)  # ARC digit labels become letters, as in the prompt
    # mcqa_prompt in the original order rebuilds the prompt: a shuffled prompt differs only in the order
    assert with_cue(mcqa_prompt(records[0]["question"], q0.options, RationaleConfig().template),
                    RationaleConfig().cue) == q0.prompt


def test_load_questions_gsm8k_style_qa():
    records = [{"question": "Natalia sold clips to 48 friends ...", "answer": GSM8K_SOLUTION},
               {"question": "How many legs do 3 cats have?", "answer": "12"},
               {"question": "Unlabelled question?"}]
    q0, q1, q2 = _questions(records, extractor="hashes", cue="")
    assert q0.prompt == "Question: Natalia sold clips to 48 friends ...\nAnswer:"
    assert (q0.id, q0.gold, q0.options) == ("0", "72", None)  # read from the worked solution
    assert q1.gold == "12"  # a bare answer is taken as it is
    assert q2.gold is None
    custom = _questions(records[:1], qa_template="Q: {question}\\nA:", cue="Think.")[0]
    assert custom.prompt == "Q: Natalia sold clips to 48 friends ...\nA: Think."


def test_load_questions_prompt_layout():
    records = [{"id": "a", "prompt": "Compute 6*7.\n", "answer": "42", "response": "6*7 = 40. The answer is 40."},
               {"id": "b", "prompt": "Compute 2+2.\n", "answer": None, "response": "2+2 = 4. The answer is 4."},
               {"id": "c", "prompt": "Say hi.\n", "answer": None, "response": None}]
    a, b, c = _questions(records)
    assert a.prompt == "Compute 6*7.\nLet's think step by step."
    assert a.gold == "42"  # the answer field wins over the response
    assert b.gold == "4"  # extracted from the reference response
    assert c.gold is None


def test_load_questions_errors():
    with pytest.raises(FirstKDError, match="--question-field"):
        _questions([{"text": "no known fields"}])
    with pytest.raises(FirstKDError, match="unique"):
        _questions([{"id": "x", "question": "a?"}, {"id": "x", "question": "b?"}])


def test_answer_is_reads_past_a_currency_sign():
    assert find_answer("It costs 3 more, so the answer is $5.", "answer-is")[0] == "5"
