"""`first-kd demo --suite reasoning`: the addition task, the suite options, and a short end-to-end run.

The task is checked against an independent reading of its traces (the written digits, read back in
reverse with the last carry, must spell a + b); the end-to-end run uses a budget small enough for CI, so
it checks the plumbing (every step ran through the CLI, the promised files and report keys, per-mode
evaluation of the dual student, resumption) rather than the suite's accuracy claims, which the full run
measures (docs/demo-results.md). Its teacher is replaced by one whose text is fixed by construction, so
what generate and the filters produce is known exactly, on any machine; the same construction with an
answer that is never right shows the demo stopping at the filter with one line saying what to change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import first_kd.cli as cli
from first_kd.config import build
from first_kd.demo import reasoning
from first_kd.demo.main import DemoConfig
from first_kd.errors import FirstKDError
from helpers import assert_checks_hold_as_stated, read_jsonl


pytestmark = pytest.mark.usefixtures("torch_threads_restored")  # the demo sets --threads


def _read_back(lines: list[str]) -> int:
    """a + b from a trace, read the way a person checks it: the written digits, most significant last."""
    written, carry = [], 0
    for line in lines[:-1]:
        m = re.fullmatch(r"(\d)\+(\d)\+([01])=(\d+) write (\d) carry ([01])", line)
        assert m, line
        x, y, c_in, total, digit, c_out = map(int, m.groups())
        assert c_in == carry and total == x + y + c_in and digit == total % 10 and c_out == total // 10
        written.append(digit)
        carry = c_out
    return int(("1" if carry else "") + "".join(map(str, reversed(written))))


@pytest.mark.parametrize("digits", [1, 3, 5])
def test_traces_spell_the_sum(digits):
    import random

    rng = random.Random(digits)
    for _ in range(300):
        a, b = rng.randrange(10 ** (digits - 1), 10 ** digits), rng.randrange(10 ** (digits - 1), 10 ** digits)
        lines = reasoning.addition_trace(a, b, digits)
        assert len(lines) == digits + 1
        assert _read_back(lines) == a + b
        assert lines[-1] == f"#### {a + b}"


def test_splits_are_disjoint_deterministic_and_extractable():
    from first_kd.data.rationale import extract_answer

    sizes = {"teacher": 60, "train": 30, "val": 20, "test": 25}
    splits = reasoning.make_splits(3, 2, sizes)
    assert splits == reasoning.make_splits(3, 2, sizes)
    assert splits != reasoning.make_splits(4, 2, sizes)
    problems = [r["prompt"].split("\n")[0] for name in ("teacher", "val") for r in splits[name]]
    problems += [f"Question: {r['question']}" for name in ("train", "test") for r in splits[name]]
    assert len(problems) == len(set(problems)) == sum(sizes.values())
    for r in splits["teacher"] + splits["val"]:
        a, b = map(int, re.search(r"(\d+)\+(\d+)", r["prompt"]).groups())
        assert r["prompt"].endswith(reasoning.CUE)
        assert extract_answer(r["response"], reasoning.EXTRACTOR) == str(a + b)
        assert _read_back(r["response"].strip().split("\n")) == a + b
    for r, q in zip(splits["answers"], splits["train"]):
        assert r["prompt"] == reasoning.question_prompt(q["question"], cue="")
        assert extract_answer(r["response"], reasoning.EXTRACTOR) == q["answer"]
    with pytest.raises(FirstKDError, match="raise --digits"):
        reasoning.make_splits(0, 1, {"teacher": 60, "train": 10})


def test_suite_options_resolve_and_foreign_ones_are_refused():
    cfg = build(DemoConfig, {"out": "x", "suite": "reasoning"})
    r = cfg.resolved()
    assert r.digits == 3 and r.teacher_layers == 4 and r.n_items is None
    assert build(DemoConfig, {"out": "x"}).resolved().teacher_layers == 3
    assert build(DemoConfig, {"out": "x", "suite": "reasoning", "teacher_steps": 5}).resolved().teacher_steps == 5
    with pytest.raises(FirstKDError, match="--eps belong.*--suite calibration"):
        build(DemoConfig, {"out": "x", "suite": "reasoning", "eps": 0.1})
    with pytest.raises(FirstKDError, match="--digits belong.*--suite reasoning"):
        build(DemoConfig, {"out": "x", "digits": 2})
    with pytest.raises(FirstKDError, match="must include 0"):
        build(DemoConfig, {"out": "x", "suite": "reasoning", "trace_levels": "0.5,1"})


# A budget a 2-core CI machine runs in well under a minute. What a teacher trained this briefly writes
# depends on the float kernels of the machine (150 steps got 1 to 3 of 48 samples right, enough for the
# filters on one machine and not on another), so the tests below replace the trained teacher's weights,
# right after its `distill` step, with a teacher whose text is fixed by construction (see
# write_fixed_text_teacher): every outcome of generate and the filters is then known in advance.
SHORT = ["suite=reasoning", "digits=1", "n_teacher=24", "n_train=8", "n_val=4", "n_test=4",
         "teacher_hidden=32", "teacher_layers=2", "student_hidden=16", "student_layers=1", "teacher_steps=4",
         "teacher_lr=1e-2", "student_steps=4", "samples=6", "batch_size=16", "agreement=0.5"]


def write_fixed_text_teacher(model_dir: Path, text: str, after: str, margin: float = 200.0) -> list[int]:
    """Set the weights of the tiny Llama in `model_dir` so that after any prompt ending like `after` it writes
    `text` and then EOS, with certainty at any sampling temperature (returns the ids it writes, EOS last).

    It is a bigram model: the attention and MLP blocks output zero, so the last hidden state is the current
    token's embedding; each token of the chain (the prompt's last token, then those of `text`) has a direction
    of its own, whose output row is its successor's by `margin` logits, so that every other token's
    probability underflows to 0 even at temperature 1.5. Every other token maps to one shared direction whose
    logits fall with the token id (no ties, so top-k is the same on every machine).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    written = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    chain = [tok(after, add_special_tokens=False)["input_ids"][-1]] + written
    keys, hidden = chain[:-1], model.config.hidden_size
    assert len(set(keys)) == len(keys) < hidden, ("a bigram needs distinct tokens", tok.convert_ids_to_tokens(chain))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, hidden - 1] = 1.0
        head[:, hidden - 1] = -torch.arange(head.shape[0], dtype=head.dtype) / head.shape[0]
        for i, (token, successor) in enumerate(zip(keys, chain[1:])):
            emb[token, hidden - 1] = 0.0
            emb[token, i] = 1.0
            head[successor, i] = margin / hidden ** 0.5  # the final RMSNorm scales a one-hot by sqrt(hidden)
    model.save_pretrained(str(model_dir))
    return written


def run_with_fixed_teacher(out: Path, monkeypatch, pick_answer) -> tuple[int, list[list[str]], dict]:
    """The short demo through first_kd.cli.main, recording every command's argv. When the teacher's
    fine-tuning step returns, its model becomes a fixed-text teacher writing "\n#### {answer}", the answer
    chosen by `pick_answer(train records, test records)`. Returns (exit code, commands, what was written)."""
    calls, fixed = [], {}
    real_main = cli.main

    def recording_main(argv=None):
        calls.append(list(argv))
        code = real_main(argv)
        if argv[0] == "distill" and argv[argv.index("--out") + 1] == str(out / "runs" / "teacher"):
            train, test = read_jsonl(out / "data" / "train.jsonl"), read_jsonl(out / "data" / "test.jsonl")
            fixed["answer"] = pick_answer(train, test)
            fixed["text"] = f"\n#### {fixed['answer']}"
            prompt = reasoning.question_prompt(train[0]["question"])
            fixed["ids"] = write_fixed_text_teacher(out / "runs" / "teacher" / "model", fixed["text"], prompt)
        return code

    monkeypatch.setattr(cli, "main", recording_main)
    return real_main(["demo", "--out", str(out), *SHORT]), calls, fixed


def _right_in_train_and_test(train: list[dict], test: list[dict]) -> str:
    """An answer some train and some test questions have, written with distinct digits (a bigram needs them)."""
    both = [r["answer"] for r in train if any(t["answer"] == r["answer"] for t in test)]
    (answer, *_) = [a for a in both if len(set(a)) == len(a)]
    return answer


def test_reasoning_demo_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    code, calls, fixed = run_with_fixed_teacher(out, monkeypatch, _right_in_train_and_test)
    assert code == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    assert_checks_hold_as_stated(report["checks"])
    models = report["results"]["models"]
    assert set(models) == set(reasoning.EVALUATED)
    assert set(models["student_dual"]) == {"slow", "fast", "auto"}
    for label, modes in models.items():
        predictions = read_jsonl(out / "eval" / label / "predictions.jsonl")
        for mode, m in modes.items():
            # each number is the one its model's own predictions give, over the 4 test questions
            lines = [p for p in predictions if p["mode"] == mode]
            assert m["n"] == len(lines) == 4, (label, mode)
            assert m["accuracy"] == pytest.approx(sum(p["correct"] for p in lines) / 4), (label, mode)
            assert m["mean_generated_tokens"] == pytest.approx(sum(p["n_generated_tokens"] for p in lines) / 4)
    for name in ("report.md", "commands.sh", "demo.yaml", "generated/train.jsonl", "filtered/train_cot.jsonl",
                 "filtered/train_sc.filter.json", "stores/train.zarr", "stores/val.zarr",
                 "eval/student_dual/metrics.json"):
        assert (out / name).exists(), name
    assert "## The reasoning demo" in (out / "report.md").read_text()
    # the printed summary has a row per model and mode, and says each check as report.json does
    for label, modes in models.items():
        for mode in modes:
            assert re.search(rf"^  {label} +{mode} ", printed, re.M), (label, mode)
    for c in report["checks"]:
        assert f"[{'ok' if c['ok'] else 'MISSED'}] {c['claim']} ({c['value']:.4f})" in printed

    # commands.sh lists exactly the commands that ran, each one parseable by the CLI
    shell = [line for line in (out / "commands.sh").read_text().splitlines() if line.startswith("first-kd ")]
    import shlex

    assert [shlex.split(line)[1:] for line in shell] == calls
    parser = cli.build_parser()
    for argv in calls:
        parser.parse_args(argv)

    # What each step made of the fixed teacher, known in advance: every sample is its text; Fine-tune-CoT
    # keeps one (distinct) rationale for each question it answers right; self-consistency keeps every
    # question (its 6 samples agree) with the fixed answer as pseudo-label; the teacher scores on test what
    # the fixed answer scores, sure of it, writing its tokens and EOS.
    train, test = read_jsonl(out / "data" / "train.jsonl"), read_jsonl(out / "data" / "test.jsonl")
    right = [r["id"] for r in train if r["answer"] == fixed["answer"]]
    samples = read_jsonl(out / "generated" / "train.jsonl")
    assert len(samples) == report["results"]["generated"]["samples"] == 8 * 6  # n_train x samples
    assert {(r["rationale"], r["answer"]) for r in samples} == {(fixed["text"], fixed["answer"])}
    assert report["results"]["generated"]["accuracy"] == pytest.approx(len(right) / 8)
    cot, sc = report["results"]["filters"]["train_cot"], report["results"]["filters"]["train_sc"]
    assert cot["method"] == "finetune-cot" and (cot["questions_kept"], cot["records_kept"]) == (len(right),) * 2
    kept = read_jsonl(out / "filtered" / "train_cot.jsonl")
    assert [(k["question_id"], k["response"], k["answer"], k["gold"]) for k in kept] == \
        [(q, fixed["text"], fixed["answer"], fixed["answer"]) for q in right]
    assert sc["questions_kept"] == 8
    assert sc["pseudo_labels"] == {"accuracy_kept": len(right) / 8, "n_kept": 8, "accuracy_all": len(right) / 8,
                                   "n_all": 8}
    teacher = models["teacher"]["auto"]
    on_test = sum(r["answer"] == fixed["answer"] for r in test) / 4
    assert on_test > 0 and teacher["accuracy"] == pytest.approx(on_test)
    assert teacher["mean_confidence"] == pytest.approx(1.0)
    assert teacher["mean_generated_tokens"] == len(fixed["ids"])

    # Re-running skips every finished step and leaves the results as they were.
    calls.clear()
    assert cli.main(["demo", "--out", str(out), *SHORT]) == 0
    assert [argv[0] for argv in calls] == ["demo", "report"]
    again = json.loads((out / "report.json").read_text())
    assert again["results"] == report["results"]


def test_a_teacher_that_is_never_right_stops_the_demo_at_the_filter(tmp_path, capsys, monkeypatch):
    """The product's behaviour when a teacher trained too briefly gets nothing right: the demo stops at
    Fine-tune-CoT with one line saying what to change, and runs nothing after it."""
    out = tmp_path / "demo"
    # "1" is no sum of two addends in 1..9: every sample is wrong.
    code, calls, fixed = run_with_fixed_teacher(out, monkeypatch, lambda train, test: "1")
    assert code == 2 and fixed["answer"] == "1"
    assert [argv[0] for argv in calls] == ["distill", "generate", "filter"]
    assert calls[-1][calls[-1].index("--method") + 1] == "finetune-cot"
    err = capsys.readouterr().err.strip().splitlines()
    assert "no records kept" in err[-2]  # the filter's own reason, then the demo's line
    assert "step 'filter cot' failed" in err[-1] and "--teacher-steps" in err[-1] and "new --out" in err[-1]
    assert not (out / "filtered" / "train_cot.jsonl").exists() and not (out / "stores").exists()
