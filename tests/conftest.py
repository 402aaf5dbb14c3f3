"""Shared test fixtures: a tiny tokenizer trained here, and the real data beside the project."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

LETTERS = "ABCDE"
_WORDS = ("cat dog bird tree house river stone cloud apple water light paper music table green "
          "quick slow small large happy where what which people travel door bank library store").split()


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """MCQA prompts ("Question: ...\\nA. ...\\nAnswer: A") and Alpaca-style text, so that " A".." E"
    and the template words become single tokens of a small BPE vocabulary."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        question = " ".join(rng.choices(_WORDS, k=rng.randint(4, 9))) + "?"
        options = "\n".join(f"{L}. {' '.join(rng.choices(_WORDS, k=rng.randint(1, 3)))}" for L in LETTERS)
        texts.append(f"Question: {question}\n{options}\nAnswer: {rng.choice(LETTERS)}")
        texts.append(f"### Instruction:\n{question}\n\n### Response:\n{' '.join(rng.choices(_WORDS, k=6))}.")
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from first_kd.tiny import train_tokenizer

    tok = train_tokenizer(tiny_corpus(), vocab_size=512)
    for L in LETTERS:  # the fixture's promise; tests rely on it
        assert len(tok.encode(" " + L, add_special_tokens=False)) == 1, L
    return tok


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is absent: real-layout tests need the shared test data beside the project")
    return path


def build_letter_sure_model(out_dir, tokenizer, scale: float = 60.0) -> Path:
    """A tiny Llama whose output rows of " A".." E" are scaled up: a random model spreads its mass over
    the whole vocabulary, this one is opinionated (and over-confident) about the option letters."""
    import torch
    from transformers import AutoModelForCausalLM

    from first_kd.tiny import build_llama

    model_dir = build_llama(out_dir, tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        for letter in LETTERS:
            (token,) = tokenizer.encode(" " + letter, add_special_tokens=False)
            model.lm_head.weight[token] *= scale
    model.save_pretrained(str(model_dir))
    return model_dir
