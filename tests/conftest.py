"""Shared test fixtures: a tiny tokenizer trained here, the real data beside the project, torch's thread
count restored. Shared helpers that are not fixtures live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import LETTERS, tiny_corpus


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a whole test module, restored after. Tiny models are fastest on one thread,
    and two threads per process on a busy 2-core CI machine spin against each other (10x slower measured).
    A module uses it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def torch_threads_restored():
    """torch's thread count as it was before the test (for code that sets it, like the demo's --threads)."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
