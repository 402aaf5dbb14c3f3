"""first_kd.decoding's answer spans: which generated tokens spell an answer, by hand and against an independent
oracle (the tokenizer's own character offsets), including a multi-byte character split over byte tokens."""

from __future__ import annotations

import pytest

from first_kd import decoding as D
from first_kd.data.rationale import find_answer


def test_answer_token_span_by_hand():
    # tokens "The", " answer", " is", " 42", "." -> ends 3, 10, 13, 16, 17; answer "42" = chars [14, 16)
    ends = [3, 10, 13, 16, 17]
    assert D.answer_token_span(ends, 14, 16) == (3, 4)
    assert D.answer_token_span(ends, 12, 15) == (2, 4)  # overlapping two tokens
    assert D.answer_token_span(ends, 0, 17) == (0, 5)
    assert D.answer_token_span(ends, 17, 18) is None  # beyond the text
    # a 3-byte character split over three tokens: the first two complete nothing and go with the third
    ends = [4, 4, 4, 5, 6]
    assert D.answer_token_span(ends, 4, 5) == (1, 4)
    assert D.answer_token_span(ends, 5, 6) == (4, 5)
    with pytest.raises(ValueError):
        D.answer_token_span(ends, 3, 3)
    with pytest.raises(ValueError):
        D.answer_token_span([3, 2], 0, 1)


@pytest.fixture(scope="module")
def small_tokenizer():
    from first_kd.tiny import train_tokenizer

    # Few merges and no "€" in training, so "€" stays three byte-tokens: the multi-byte case is exercised.
    return train_tokenizer(["the answer is 42. so the answer is twelve, not 7."] * 20, vocab_size=280)


@pytest.mark.parametrize("text, extractor", [
    ("so the answer is 42.", "answer-is"),
    ("first 7, so the answer is twelve.", "answer-is"),
    ("the price: the answer is €42", r"answer is (?P<answer>\S+)"),
    ("the answer is 7 €", r"(?P<answer>€)"),
])
def test_answer_span_matches_the_tokenizer_offsets(small_tokenizer, text, extractor):
    enc = small_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    _, start, end = find_answer(text, extractor)
    span = D.answer_token_span(D.decoded_token_ends(small_tokenizer, ids), start, end)
    # oracle: the tokens whose own character offsets overlap the answer
    expected = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
    assert span == (expected[0], expected[-1] + 1)
    assert text[start:end] in small_tokenizer.decode(ids[span[0]: span[1]])
