"""Multiple-choice data with default options works with the tokenizer families people use, each built here
with `tokenizers`, saved and loaded back through AutoTokenizer (the real loading code):

  * SentencePiece with the Llama-2 / Mistral hub layout ("legacy": a normalizer prepends '▁' and turns
    spaces into '▁'), BPE and Unigram: ' A' on its own is two tokens ('▁', '▁A'), the letter after
    "Answer:" is the one token '▁A'. The old default (--answer-prefix ' ') refused these.
  * SentencePiece with a Metaspace pre-tokenizer (transformers 5's Llama layout), BPE and Unigram.
  * Byte-level BPE (GPT-2, Llama-3, Qwen): ' A' is 'ĠA' on its own and in context.
"""

from __future__ import annotations

import json
import random

import datasets
import pytest

from first_kd.cli import main
from first_kd.data import DataConfig, tokenize_records
from first_kd.errors import FirstKDError
from first_kd.store import open_store

from helpers import CORPUS_WORDS, LETTERS, tiny_corpus, write_jsonl

SENTENCEPIECE = {  # family -> train_sentencepiece_tokenizer options
    "llama2-bpe": dict(model="bpe", layout="legacy"),
    "llama2-unigram": dict(model="unigram", layout="legacy"),
    "metaspace-bpe": dict(model="bpe", layout="metaspace"),
    "metaspace-unigram": dict(model="unigram", layout="metaspace"),
}
FAMILIES = [*SENTENCEPIECE, "byte-level"]
LEGACY = [name for name, opts in SENTENCEPIECE.items() if opts["layout"] == "legacy"]


def build_tokenizer(family: str, out_dir):
    """Train the family's tokenizer on the tiny corpus, save it to `out_dir` and load it back."""
    from transformers import AutoTokenizer

    from first_kd.tiny import train_sentencepiece_tokenizer, train_tokenizer

    if family == "byte-level":
        train_tokenizer(tiny_corpus(), vocab_size=512, out_dir=out_dir)
    else:  # a tiny Unigram corpus may not keep '▁A' .. '▁E', which every real SentencePiece vocabulary has
        train_sentencepiece_tokenizer(tiny_corpus(), vocab_size=512, out_dir=out_dir,
                                      pieces=["▁" + L for L in LETTERS], **SENTENCEPIECE[family])
    return AutoTokenizer.from_pretrained(str(out_dir))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    return request.param, build_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


def mcqa_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"q{i}", "question": " ".join(rng.choices(CORPUS_WORDS, k=rng.randint(3, 9))) + "?",
             "choices": {"label": list(LETTERS), "text": [rng.choice(CORPUS_WORDS) for _ in LETTERS]},
             "answerKey": rng.choice(LETTERS)} for i in range(n)]


def prompt_of(record: dict) -> str:
    options = "\n".join(f"{L}. {t}" for L, t in zip(LETTERS, record["choices"]["text"]))
    return f"Question: {record['question']}\n{options}\nAnswer:"


def expected_letter_tokens(name: str) -> list[str]:
    return [("ĠA" if name == "byte-level" else "▁A").replace("A", L) for L in LETTERS]


def test_default_finds_each_letter_after_the_prompt(family):
    name, tok = family
    records = mcqa_records(20)
    out, info = tokenize_records(datasets.Dataset.from_list(records), tok, DataConfig())
    assert tok.convert_ids_to_tokens(info["choice_token_ids"]) == expected_letter_tokens(name)
    for row, record in zip(out, records):
        start, prompt = row["target_start"], prompt_of(record)
        assert row["input_ids"][:start] == tok(prompt)["input_ids"]
        # Oracle: the whole text "... Answer: B" tokenized at once ends in exactly the target token.
        assert row["input_ids"] == tok(prompt + " " + record["answerKey"])["input_ids"]
        assert row["input_ids"][start:] == [info["choice_token_ids"][LETTERS.index(record["answerKey"])]]


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_sentencepiece_needed_a_hand_flag_and_explicit_prefixes_still_work(name, tmp_path):
    tok = build_tokenizer(name, tmp_path)
    assert len(tok.encode(" A", add_special_tokens=False)) == 2  # the reported problem: '▁', '▁A'
    ds = datasets.Dataset.from_list(mcqa_records(6))
    with pytest.raises(FirstKDError) as e:  # an explicit prefix means prefix + letter on its own, as before
        tokenize_records(ds, tok, DataConfig(answer_prefix=" "))
    message = str(e.value)
    assert "\n" not in message and "record 0" in message and "--answer-prefix auto" in message
    auto, auto_info = tokenize_records(ds, tok, DataConfig())
    empty, empty_info = tokenize_records(ds, tok, DataConfig(answer_prefix=""))  # the workaround users found
    assert empty_info["choice_token_ids"] == auto_info["choice_token_ids"]
    assert list(empty["input_ids"]) == list(auto["input_ids"])


@pytest.mark.parametrize("name", ["llama2-bpe", "llama2-unigram", "byte-level"])
def test_cache_and_evaluate_with_default_options(name, tmp_path):
    """End to end through the CLI: a tiny teacher with each family's tokenizer caches multiple-choice data and
    is evaluated on it, with no data option given."""
    from first_kd.tiny import build_llama

    tok = build_tokenizer(name, tmp_path / "tok")
    model = build_llama(tmp_path / "model", tok, hidden_size=32, num_layers=1, num_heads=2)
    records = mcqa_records(8)
    data = write_jsonl(tmp_path / "mc.jsonl", records)
    store_path = tmp_path / "mc.zarr"
    assert main(["cache", "--teacher", str(model), "--data", str(data), "--out", str(store_path)]) == 0
    store = open_store(store_path)
    choice_ids = store.attrs["data"]["choice_token_ids"]
    assert tok.convert_ids_to_tokens(choice_ids) == expected_letter_tokens(name)
    for i, record in enumerate(records):
        rec = store.get(i)
        (position,) = rec["target_positions"]
        assert rec["input_ids"][position + 1] == choice_ids[LETTERS.index(record["answerKey"])]
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == len(records)


def test_prompt_ending_in_a_newline_takes_the_bare_letter(tmp_path):
    """A chat template's assistant turn ends in a newline: the answer follows as 'A', not ' A'."""
    tok = build_tokenizer("byte-level", tmp_path)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]\n{% endif %}")
    records = mcqa_records(4)
    out, info = tokenize_records(datasets.Dataset.from_list(records), tok, DataConfig(chat_template=True))
    assert tok.convert_ids_to_tokens(info["choice_token_ids"]) == list(LETTERS)
    for row, record in zip(out, records):
        text = f"[user] {prompt_of(record)}\n[assistant]\n{record['answerKey']}"
        assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_letters_that_are_not_one_token_after_the_prompt_are_one_line_errors(tmp_path):
    tok = build_tokenizer("byte-level", tmp_path)
    records = mcqa_records(3)

    def error(recs, **cfg) -> str:
        with pytest.raises(FirstKDError) as e:
            tokenize_records(datasets.Dataset.from_list(recs), tok, DataConfig(**cfg))
        assert "\n" not in str(e.value)
        return str(e.value)

    # A template ending in a space: the space and the letter become one token (' A'), so the prompt's last
    # token (' ') is not followed by a letter token of its own.
    message = error(records, template="Question: {question}\n{options}\nAnswer: ")
    assert "record 0" in message and "--template" in message and "--answer-prefix" in message
    # Prompts that end differently give a letter different tokens: named with both records.
    mixed = [{**r, "cue": cue} for r, cue in zip(records, ["Answer:", "Answer:", "Answer:\n"])]
    message = error(mixed, template="Question: {question}\n{options}\n{cue}")
    assert "record 2 (id q2)" in message and "record 0" in message and "--answer-prefix" in message
    # A letter the tokenizer splits after the prompt, needed only by a later record: that record is named.
    rare = next(L for L in "FGHIJKLMNOPQRSTUVWXYZ" if len(tok.encode(" " + L, add_special_tokens=False)) > 1)
    many = {"id": "m", "question": "q?", "choices": [f"o{i}" for i in range(ord(rare) - ord("A") + 1)], "answer": 0}
    message = error([{"id": "a", "question": "q?", "choices": ["x", "y"], "answer": 1}, many])
    assert "record 1 (id m)" in message and repr(rare) in message


def test_demo_tokenizer_keeps_its_choice_ids():
    """The demo's byte-level tokenizer: the default finds exactly the ids ' A'.. ' E' had (the demo's numbers)."""
    from first_kd.demo import calibration as demo
    from first_kd.tiny import train_tokenizer

    _, splits = demo.make_splits(0, 20, {"train": (300, 0.25), "test": (200, 0.25)})
    tok = train_tokenizer([demo.prompt_text(r) + " " + r["answer"] for r in splits["train"]], 512)
    ds = datasets.Dataset.from_list(splits["test"])
    auto, auto_info = tokenize_records(ds, tok, DataConfig())
    spaced, spaced_info = tokenize_records(ds, tok, DataConfig(answer_prefix=" "))
    assert auto_info["choice_token_ids"] == spaced_info["choice_token_ids"] == [
        tok.encode(" " + L, add_special_tokens=False)[0] for L in LETTERS]
    assert list(auto["input_ids"]) == list(spaced["input_ids"])


def test_real_gpt2_letter_ids_unchanged(shared_data):
    from transformers import GPT2TokenizerFast

    directory = shared_data / "tokenizers/gpt2"
    if not directory.is_dir():
        pytest.skip("../shared/data/tokenizers/gpt2 is absent")
    tok = GPT2TokenizerFast(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"))
    ds = datasets.Dataset.from_list(mcqa_records(50))
    auto, info = tokenize_records(ds, tok, DataConfig())
    spaced, _ = tokenize_records(ds, tok, DataConfig(answer_prefix=" "))
    assert info["choice_token_ids"] == [317, 347, 327, 360, 412]  # GPT-2's ' A' .. ' E'
    assert list(auto["input_ids"]) == list(spaced["input_ids"])
