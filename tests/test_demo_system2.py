"""`first-kd demo --suite system2`: the coin-flip task, the suite options, and a short end-to-end run.

The task is checked against an independent reading of the rephrasings (the side written after each person
must be the previous one flipped or not by that person's sentence of the question, and the answer the last
side). The end-to-end run uses a budget small enough for CI, so it checks the plumbing (every step ran through
the CLI, the promised files and report keys, the figures each come from their own predictions, resumption)
rather than the suite's accuracy claims, which the full run measures (docs/demo-system2-results.md). As in
tests/test_demo_reasoning.py, the trained teacher is replaced by one whose text is fixed by construction, so
what generate and the filter produce is known exactly, on any machine.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

import first_kd.cli as cli
from first_kd.config import build
from first_kd.demo import system2
from first_kd.demo.main import DemoConfig
from first_kd.errors import FirstKDError
from helpers import assert_checks_hold_as_stated, read_jsonl, write_fixed_text_model

pytestmark = pytest.mark.usefixtures("torch_threads_restored")  # the demo sets --threads


def _read_back(question: str, response: str) -> str:
    """The answer a rephrasing states, after checking every side it writes against the question."""
    people = re.findall(r"(\w+) (flips the coin|does not flip the coin)\.", question)
    steps = re.fullmatch(r" Rephrased: the coin starts heads up; (.*)\. Is it still heads up\? It ends (heads|tails) "
                         r"up, so (yes|no)\. The answer is (yes|no)\.", response)
    assert steps, response
    side = "heads"
    written = steps.group(1).split("; ")
    assert len(written) == len(people)
    for (name, verb), step in zip(people, written):
        if verb.startswith("flips"):
            side = {"heads": "tails", "tails": "heads"}[side]
        assert step == (f"{name} flips it: {side}" if verb.startswith("flips") else f"{name} does not: {side}")
    assert steps.group(2) == side and steps.group(3) == steps.group(4) == ("yes" if side == "heads" else "no")
    return steps.group(4)


def test_splits_are_disjoint_deterministic_and_right():
    sizes = {"teacher": 60, "train": 30, "test": 25}
    splits = system2.make_splits(3, 4, sizes)
    assert splits == system2.make_splits(3, 4, sizes)
    assert splits != system2.make_splits(4, 4, sizes)
    teacher = splits["teacher"]
    assert len(teacher) == 2 * sizes["teacher"]
    questions = [r["prompt"] for r in teacher[::2]] + [r["question"] for n in ("train", "test") for r in splits[n]]
    assert len(set(questions)) == sum(sizes.values())
    for direct, program in zip(teacher[::2], teacher[1::2]):
        # the same question twice: bare with the direct answer, in the program's prompt with the rephrasing
        assert program["prompt"] == system2.program_prompt(direct["prompt"])
        assert program["prompt"].startswith(direct["prompt"] + "\n")
        answer = _read_back(direct["prompt"], program["response"])
        assert direct["response"] == f" The answer is {answer}."
        assert len(re.findall(r"flip", direct["prompt"])) == 4
    for r in splits["train"] + splits["test"]:
        flips = len(re.findall(r"\w+ flips the coin", r["question"]))
        assert r["answer"] == ("no" if flips % 2 else "yes")
    with pytest.raises(FirstKDError, match="raise --people"):
        system2.make_splits(0, 1, {"teacher": 60, "train": 10})


def test_direct_share_teaches_the_direct_answer_on_evenly_spread_questions():
    sizes = {"teacher": 60, "train": 30, "test": 25}
    full, share = system2.make_splits(3, 4, sizes), system2.make_splits(3, 4, sizes, direct_share=0.25)
    assert [r for r in share["teacher"] if r["id"].endswith("-program")] == full["teacher"][1::2]
    assert share["train"] == full["train"] and share["test"] == full["test"]
    direct = [int(r["id"].split("-")[1]) for r in share["teacher"] if r["id"].endswith("-direct")]
    assert direct == list(range(3, 60, 4))  # every fourth question, each just before its program record
    for i, r in enumerate(share["teacher"]):
        if r["id"].endswith("-direct"):
            assert share["teacher"][i + 1]["prompt"] == system2.program_prompt(r["prompt"])
    with pytest.raises(FirstKDError, match="--direct-share must be in"):
        build(DemoConfig, {"out": "x", "suite": "system2", "direct_share": 0.0001})


def test_suite_options_resolve_and_foreign_ones_are_refused():
    r = build(DemoConfig, {"out": "x", "suite": "system2"}).resolved()
    assert r.people == 5 and r.n_val is None and r.digits is None and r.samples == 4 and r.direct_share == 0.1
    with pytest.raises(FirstKDError, match="--digits belong.*--suite reasoning"):
        build(DemoConfig, {"out": "x", "suite": "system2", "digits": 2})
    with pytest.raises(FirstKDError, match="--n-val belong.*--suite calibration"):
        build(DemoConfig, {"out": "x", "suite": "system2", "n_val": 20})
    with pytest.raises(FirstKDError, match="--people belong.*--suite system2"):
        build(DemoConfig, {"out": "x", "people": 3})
    with pytest.raises(FirstKDError, match="--people must be in"):
        build(DemoConfig, {"out": "x", "suite": "system2", "people": 0})


SHORT = ["suite=system2", "people=3", "n_teacher=16", "n_train=8", "n_test=6", "teacher_hidden=32",
         "teacher_layers=1", "student_hidden=16", "student_layers=1", "teacher_steps=2", "student_steps=3",
         "samples=3", "batch_size=8"]
FIXED_TEXT = " The answer is yes"


def run_with_fixed_teacher(out: Path, monkeypatch) -> tuple[int, list[list[str]], list[int]]:
    """The short demo through first_kd.cli.main, recording every command's argv; when the teacher's fine-tuning
    returns, its model becomes a fixed-text teacher writing FIXED_TEXT after both kinds of prompt."""
    calls, fixed = [], []
    real_main = cli.main

    def recording_main(argv=None):
        calls.append(list(argv))
        code = real_main(argv)
        if argv[0] == "distill" and argv[argv.index("--out") + 1] == str(out / "runs" / "teacher"):
            question = read_jsonl(out / "data" / "train.jsonl")[0]["question"]
            fixed.extend(write_fixed_text_model(out / "runs" / "teacher" / "model", FIXED_TEXT,
                                                  [question, system2.program_prompt(question)]))
        return code

    monkeypatch.setattr(cli, "main", recording_main)
    return real_main(["demo", "--out", str(out), *SHORT]), calls, fixed


def test_system2_demo_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    code, calls, fixed = run_with_fixed_teacher(out, monkeypatch)
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert_checks_hold_as_stated(report["checks"])
    models = report["results"]["models"]
    assert list(models) == list(system2.EVALUATED)
    for label in system2.DIRECT_EVALUATED:  # each figure is the one its own predictions give
        lines = read_jsonl(out / "eval" / label / "predictions.jsonl")
        assert models[label]["n"] == len(lines) == 6
        assert models[label]["accuracy"] == pytest.approx(sum(p["correct"] for p in lines) / 6)
        assert models[label]["mean_generated_tokens"] == pytest.approx(sum(p["n_generated_tokens"] for p in lines) / 6)
    for name in ("report.md", "commands.sh", "demo.yaml", "generated/test_program.jsonl", "generated/train.jsonl",
                 "filtered/train_s2.jsonl", "filtered/train_s2.filter.json", "runs/student/summary.json"):
        assert (out / name).exists(), name
    assert "## The System-2 distillation demo" in (out / "report.md").read_text()
    for label in models:
        assert re.search(rf"^  {label} +", printed, re.M), label
    for c in report["checks"]:
        assert f"[{'ok' if c['ok'] else 'MISSED'}] {c['claim']} ({c['value']:.4f})" in printed

    # commands.sh lists exactly the commands that ran, each one parseable by the CLI
    shell = [line for line in (out / "commands.sh").read_text().splitlines() if line.startswith("first-kd ")]
    assert [shlex.split(line)[1:] for line in shell] == calls
    assert [argv[0] for argv in calls] == ["distill", "evaluate", "generate", "generate", "filter", "distill",
                                           "evaluate", "generate", "filter", "distill", "evaluate", "report"]
    parser = cli.build_parser()
    for argv in calls:
        parser.parse_args(argv)

    # What each step made of the fixed teacher, known in advance: it answers "yes" to every question, directly
    # and through the program, in the same tokens; every question's runs agree, so the filter keeps them all
    # as bare question -> " The answer is yes."
    train, test = read_jsonl(out / "data" / "train.jsonl"), read_jsonl(out / "data" / "test.jsonl")
    yes_test = sum(r["answer"] == "yes" for r in test) / 6
    for label in ("teacher_direct", "teacher_program"):
        assert models[label]["accuracy"] == pytest.approx(yes_test), label
        assert models[label]["mean_generated_tokens"] == len(fixed), label
    program_runs = read_jsonl(out / "generated" / "test_program.jsonl")
    assert [r["stage_prompts"]["respond"] for r in program_runs] == [system2.program_prompt(r["question"])
                                                                     for r in test]
    assert all(r["prompt"] == q["question"] for r, q in zip(program_runs, test))
    samples = read_jsonl(out / "generated" / "train.jsonl")
    assert len(samples) == 8 * 3 and {(r["final"], r["answer"]) for r in samples} == {(FIXED_TEXT, "yes")}
    direct = read_jsonl(out / "generated" / "train_direct.jsonl")  # the control's System 1 answers: the same
    assert len(direct) == 8 * 3 and {(r["rationale"], r["answer"]) for r in direct} == {(FIXED_TEXT, "yes")}
    assert all(r["prompt"] == q["question"] for r, q in zip(direct[::3], train))
    yes_train = sum(r["answer"] == "yes" for r in train) / 8
    for name, key in (("train_s2", "filter"), ("train_s1", "filter_s1")):
        kept = read_jsonl(out / "filtered" / f"{name}.jsonl")
        assert [(k["prompt"], k["response"]) for k in kept] == [(r["question"], " The answer is yes.") for r in train]
        pseudo = report["results"][key]["pseudo_labels"]
        assert pseudo == {"accuracy_kept": yes_train, "n_kept": 8, "accuracy_all": yes_train, "n_all": 8}

    # Re-running skips every finished step and leaves the results as they were.
    calls.clear()
    assert cli.main(["demo", "--out", str(out), *SHORT]) == 0
    assert [argv[0] for argv in calls] == ["demo", "report"]
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]
