"""Helpers shared by the tests, written once: import them with `from helpers import NAME`.

pytest puts tests/ on sys.path (as it does for conftest.py, which holds the shared fixtures); test modules
never import each other or conftest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LETTERS = "ABCDE"
# Words of the made-up questions and answers; the tiny tokenizer's corpus has a few more.
WORDS = ("cat dog bird tree house river stone cloud apple water light paper music table green").split()
CORPUS_WORDS = WORDS + "quick slow small large happy where what which people travel door bank library store".split()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# Data


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """MCQA prompts ("Question: ...\\nA. ...\\nAnswer: A") and Alpaca-style text, so that " A".." E"
    and the template words become single tokens of a small BPE vocabulary."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        question = " ".join(rng.choices(CORPUS_WORDS, k=rng.randint(4, 9))) + "?"
        options = "\n".join(f"{L}. {' '.join(rng.choices(CORPUS_WORDS, k=rng.randint(1, 3)))}" for L in LETTERS)
        texts.append(f"Question: {question}\n{options}\nAnswer: {rng.choice(LETTERS)}")
        texts.append(f"### Instruction:\n{question}\n\n### Response:\n{' '.join(rng.choices(CORPUS_WORDS, k=6))}.")
    return texts


def mcqa_records(n: int, seed: int = 0) -> list[dict]:
    """Multiple-choice records in the HuggingFace CommonsenseQA/ARC layout (choices {label, text}, answerKey)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        texts = [" ".join(rng.choices(CORPUS_WORDS, k=rng.randint(1, 3))) for _ in LETTERS]
        out.append({"id": f"mc-{i}", "question": " ".join(rng.choices(CORPUS_WORDS, k=rng.randint(3, 12))) + "?",
                    "choices": {"label": list(LETTERS), "text": texts}, "answerKey": rng.choice(LETTERS)})
    return out


def pr_records(n: int, seed: int = 0) -> list[dict]:
    """Prompt/response records of random words."""
    rng = random.Random(seed)
    return [{"id": f"pr-{i}", "prompt": " ".join(rng.choices(CORPUS_WORDS, k=rng.randint(2, 10))),
             "response": " ".join(rng.choices(CORPUS_WORDS, k=rng.randint(1, 12)))} for i in range(n)]


def write_mcqa(path, n: int, seed: int = 0, *, question_words=(3, 9), id_format: str = "q{i}"):
    """A flat multiple-choice jsonl (choices a list, answer a letter) of `n` questions with 3 to 5 options each,
    so one batch mixes option counts. `question_words`: the question's length in words, or (low, high) to
    draw it; `id_format` may use {i} and {seed}. Returns `path`."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = rng.randint(3, 5)
            length = question_words if isinstance(question_words, int) else rng.randint(*question_words)
            f.write(json.dumps({"id": id_format.format(i=i, seed=seed),
                                "question": " ".join(rng.choices(WORDS, k=length)) + "?",
                                "choices": [" ".join(rng.choices(WORDS, k=2)) for _ in range(k)],
                                "answer": "ABCDE"[rng.randrange(k)]}) + "\n")
    return path


def write_jsonl(path, records) -> Path:
    """`records` as one JSON object per line; returns `path`."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def small_cache_args(teacher, data, out, *extra) -> list[str]:
    """`first-kd cache` argv for a tiny teacher: 64-row units (so a few units to kill and resume) and 3 sequences
    per forward."""
    return ["cache", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--chunk-positions", "64",
            "--batch-size", "3", *extra]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Models


def build_peaked_model(out_dir, tokenizer, scale: float = 40.0, **sizes) -> Path:
    """A tiny Llama (first_kd.tiny.build_llama with `sizes`) whose output head is scaled by `scale`, so its
    distributions are peaked like a trained model's: its top-k order and greedy argmax are not decided by
    float noise (padded or not, one process or two)."""
    import torch
    from transformers import AutoModelForCausalLM

    from first_kd.tiny import build_llama

    path = build_llama(out_dir, tokenizer, **sizes)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    model.save_pretrained(path)
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


def write_fixed_text_model(model_dir, text: str, after: list[str], margin: float = 200.0) -> list[int]:
    """Set the weights of the tiny Llama in `model_dir` so that after any prompt whose last token is the last
    token of one of `after` it writes `text` and then EOS, with certainty at any sampling temperature (returns
    the ids it writes, EOS last): what a demo step makes of it is then known on any machine.

    A bigram model: the attention and MLP blocks output zero, so the last hidden state is the current token's
    embedding. Direction 0 leads from the `after` tokens to the text's first token; each token of the text has a
    direction of its own whose output row is its successor's by `margin` logits, so every other token's
    probability underflows to 0. Every other token shares one direction whose logits fall with the token id (no
    ties). The text's tokens must be distinct, and distinct from the `after` tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    written = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    starts = sorted({tok(a, add_special_tokens=False)["input_ids"][-1] for a in after})
    keys, hidden = written[:-1], model.config.hidden_size
    assert len(set(keys + starts)) == len(keys) + len(starts) and len(keys) + 2 < hidden, \
        ("a bigram needs distinct tokens", tok.convert_ids_to_tokens(starts + written))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, hidden - 1] = 1.0
        head[:, hidden - 1] = -torch.arange(head.shape[0], dtype=head.dtype) / head.shape[0]
        for token in starts:
            emb[token, hidden - 1], emb[token, 0] = 0.0, 1.0
        head[written[0], 0] = margin / hidden ** 0.5  # the final RMSNorm scales a one-hot by sqrt(hidden)
        for i, (token, successor) in enumerate(zip(keys, written[1:]), start=1):
            emb[token, hidden - 1], emb[token, i] = 0.0, 1.0
            head[successor, i] = margin / hidden ** 0.5
    model.save_pretrained(str(model_dir))
    return written


# ----------------------------------------------------------------------------------------------
# Outputs on disk, and the CLI in a subprocess


def is_png(path) -> bool:
    return Path(path).read_bytes()[:8] == PNG_MAGIC


def file_bytes(directory, recursive: bool = False) -> dict:
    """{name: bytes} of the files in `directory` ({relative path: bytes} of every file below it with
    `recursive`): compare before and after to see that nothing was touched."""
    directory = Path(directory)
    if recursive:
        return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def leftovers(parent) -> list[str]:
    """The staging or retired copies (first_kd.outputs) left in `parent`."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith((".staging-", ".retired-")))


def unwritable(tmp_path: Path) -> Path:
    """A path whose directory cannot be created. Root ignores permission bits (CI runs tests as root), so
    there it is a path under /sys, where no process may make entries (EPERM; EROFS where /sys is mounted
    read-only); otherwise a path inside a directory made read-only with chmod."""
    import pytest

    if os.geteuid() == 0:
        target = Path("/sys/first-kd-test-unwritable/out")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o555)
        target = parent / "out"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / "probe").write_text("")
    except OSError:
        return target
    pytest.skip(f"{target.parent} is writable here: no way to simulate a read-only directory")


@contextlib.contextmanager
def read_only_dir(path: Path):
    """Make `path` a directory nothing can be created in or renamed into. Root (CI runs tests as root)
    ignores permission bits, so there the directory is made immutable (chattr +i); where neither works
    the test is skipped."""
    import pytest

    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root on a filesystem without chattr +i: cannot make a read-only directory")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def run_cli(args, env=None, limit_bytes=None, timeout=None) -> subprocess.CompletedProcess:
    """`python -m first_kd.cli ARGS` in a subprocess from the repository root, output captured as text; `env`
    adds variables; `limit_bytes` caps the size of any file it writes (RLIMIT_FSIZE: Python ignores SIGXFSZ,
    so a write past it fails with EFBIG, as on a full disk)."""
    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "first_kd.cli", *args], cwd=REPO, env=dict(os.environ, **(env or {})),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=cap if limit_bytes else None)


# ----------------------------------------------------------------------------------------------
# The demos


def assert_checks_hold_as_stated(checks: list[dict]) -> None:
    """A demo's checks ({"claim": "WHAT OP BOUND", "value", "ok"}, OP one of >=, <=, ==) say the truth:
    `ok` is whether the measured value satisfies the bound the claim states (a NaN value satisfies none)."""
    assert checks, "no checks"
    for check in checks:
        stated = re.fullmatch(r"(.+) (>=|<=|==) (-?\d+(?:\.\d+)?)", check["claim"])
        assert stated, f"a check must end with OP BOUND: {check['claim']!r}"
        op, bound, value = stated.group(2), float(stated.group(3)), float(check["value"])
        holds = not math.isnan(value) and {">=": value >= bound - 1e-12, "<=": value <= bound + 1e-12,
                                           "==": abs(value - bound) < 1e-9}[op]
        assert check["ok"] is holds, check
