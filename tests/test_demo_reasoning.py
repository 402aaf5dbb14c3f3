"""`first-kd demo --suite reasoning`: the addition task, the suite options, and a short end-to-end run.

The task is checked against an independent reading of its traces (the written digits, read back in
reverse with the last carry, must spell a + b); the end-to-end run uses a budget small enough for CI, so
it checks the plumbing (every step ran through the CLI, the promised files and report keys, per-mode
evaluation of the dual student, resumption) rather than the suite's accuracy claims, which the full run
measures (docs/demo-results.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import first_kd.cli as cli
from first_kd import demo_reasoning as reasoning
from first_kd.config import build
from first_kd.demo import DemoConfig
from first_kd.errors import FirstKDError


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


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
    from first_kd.rationale import extract_answer

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


# A budget a 2-core CI machine runs in well under a minute; 1-digit sums keep every step meaningful
# (the teacher learns them in this budget, so the filters keep rationales and the students have data).
SHORT = ["suite=reasoning", "digits=1", "n_teacher=24", "n_train=8", "n_val=4", "n_test=4",
         "teacher_hidden=32", "teacher_layers=2", "student_hidden=16", "student_layers=1", "teacher_steps=150",
         "teacher_lr=1e-2", "student_steps=4", "samples=6", "batch_size=16", "agreement=0.5"]


def test_reasoning_demo_end_to_end(tmp_path, capsys, monkeypatch):
    calls = []
    real_main = cli.main

    def recording_main(argv=None):
        calls.append(list(argv))
        return real_main(argv)

    monkeypatch.setattr(cli, "main", recording_main)
    out = tmp_path / "demo"
    assert real_main(["demo", "--out", str(out), *SHORT]) == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "report.json").read_text())
    assert {c["claim"] for c in report["checks"]} and all("ok" in c for c in report["checks"])
    models = report["results"]["models"]
    assert set(models) == set(reasoning.EVALUATED)
    assert set(models["student_dual"]) == {"slow", "fast", "auto"}
    for label, modes in models.items():
        for mode, m in modes.items():
            assert m["n"] == 4 and 0.0 <= m["accuracy"] <= 1.0 and m["mean_generated_tokens"] > 0, (label, mode)
    assert report["results"]["filters"]["train_cot"]["method"] == "finetune-cot"
    assert report["results"]["generated"]["samples"] == 8 * 6  # n_train x samples
    assert "pseudo_labels" in report["results"]["filters"]["train_sc"]
    for name in ("report.md", "commands.sh", "demo.yaml", "generated/train.jsonl", "filtered/train_cot.jsonl",
                 "filtered/train_sc.filter.json", "stores/train.zarr", "stores/val.zarr",
                 "eval/student_dual/metrics.json"):
        assert (out / name).exists(), name
    assert "## The reasoning demo" in (out / "report.md").read_text()
    assert "student_dual" in printed and ("[ok]" in printed or "[MISSED]" in printed)

    # commands.sh lists exactly the commands that ran, each one parseable by the CLI
    shell = [line for line in (out / "commands.sh").read_text().splitlines() if line.startswith("first-kd ")]
    import shlex

    assert [shlex.split(line)[1:] for line in shell] == calls
    parser = cli.build_parser()
    for argv in calls:
        parser.parse_args(argv)

    # The dual student's training data holds all three variants of every kept rationale.
    kept = [json.loads(line) for line in (out / "filtered/train_cot.jsonl").read_text().splitlines()]
    assert kept and all(k["answer"] == k["gold"] for k in kept)

    # Re-running skips every finished step and leaves the results as they were.
    calls.clear()
    assert real_main(["demo", "--out", str(out), *SHORT]) == 0
    assert [argv[0] for argv in calls] == ["report"]
    again = json.loads((out / "report.json").read_text())
    assert again["results"] == report["results"]
