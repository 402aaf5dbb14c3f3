"""`first-kd filter`: the two filters against hand-made generate records whose fate is known (an oracle
count per drop reason), the diversity choice, the threshold boundary, ties, perturbation, pseudo-label
accuracy, reports that add up on random records, and the command end to end: its output read back by
data.prepare_dataset, and its one-line errors."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from first_kd.commands import filter as filters
from first_kd.cli import main
from first_kd.data import DataConfig, prepare_dataset
from first_kd.errors import FirstKDError
from first_kd.data.rationale import with_cue
from first_kd.selection import (choose_diverse, finetune_cot, jaccard_distance, majority, self_consistency, strip_cue,
                                to_training_records)
from helpers import file_bytes, read_jsonl, run_cli, write_jsonl

CUE = "Let's think step by step."


def rec(qid, sample, answer, gold=None, rationale=None, perturbed=False, finished=True, prompt=None):
    """One `first-kd generate` line."""
    if rationale is None:
        rationale = f" Step for {qid} sample {sample}.\nSo the answer is {answer}."
    return {"id": qid, "sample": sample, "prompt": prompt or f"Question: {qid}?\nAnswer: {CUE}",
            "rationale": rationale, "answer": answer, "gold": gold, "perturbed": perturbed,
            "n_tokens": 12, "finished": finished}


def kept_keys(kept):
    return [(r["id"], r["sample"]) for r in kept]


def check_sums(report):
    assert report["records_kept"] + sum(report["dropped_records"].values()) == report["records_in"]
    assert report["questions_kept"] + sum(report["dropped_questions"].values()) == report["questions_in"]


# ----------------------------------------------------------------------------------------------
# Fine-tune-CoT


def test_finetune_cot_counts_every_reason():
    records = [
        rec("q1", 0, "B", "B", " Birds fly.\nThe answer is B."),
        rec("q1", 1, "B", "B", "  Birds   fly.\n\nThe answer is B. "),  # same text up to whitespace
        rec("q1", 2, "C", "B"),
        rec("q1", 3, None, "B", " I am not sure."),
        rec("q1", 7, "B", "B", perturbed=True),
        rec("q2", 0, "A", None), rec("q2", 1, "B", None),
        rec("q3", 0, "6", "7"), rec("q3", 1, "8", "7"),
        rec("q4", 0, "A", "A", finished=False), rec("q4", 1, "C", "A"),
        rec("q5", 0, "A", "A", " red green blue"), rec("q5", 1, "A", "A", " red green blue yellow"),
        rec("q5", 2, "A", "A", " cat dog"),
        rec("q6", 0, None, "A"),
    ]
    kept, report = finetune_cot(records, max_per_question=2)
    # q5: sample 0 first, then the far one (2), not the near copy (1).
    assert kept_keys(kept) == [("q1", 0), ("q5", 0), ("q5", 2)]
    assert report["dropped_records"] == {
        "perturbed sample": 1, "duplicate rationale": 1, "wrong answer": 4, "no answer extracted": 2,
        "no gold answer": 2, "unfinished rationale": 1, "over max per question": 1}
    assert report["dropped_questions"] == {"no gold answer": 1, "no correct answer": 1,
                                           "unfinished rationale": 1, "no answer extracted": 1}
    assert (report["questions_in"], report["questions_kept"], report["records_in"], report["records_kept"]) == \
        (6, 2, 15, 3)
    assert "pseudo_labels" not in report
    check_sums(report)


def test_finetune_cot_no_cap_keeps_every_distinct_correct_rationale_in_sample_order():
    records = [rec("q", s, "4", "4", f" way {s}") for s in (3, 0, 2, 1)] + [rec("q", 4, "4", "4", " way 0")]
    kept, report = finetune_cot(records, max_per_question=0)
    assert kept_keys(kept) == [("q", 0), ("q", 1), ("q", 2), ("q", 3)]
    assert report["dropped_records"] == {"duplicate rationale": 1}


def test_finetune_cot_does_not_depend_on_record_order():
    rng = random.Random(0)
    records = [rec(f"q{q}", s, rng.choice("AB"), "A", " ".join(rng.choices("abcdefgh", k=5)))
               for q in range(6) for s in range(5)]
    expected, _ = finetune_cot(records, max_per_question=2)
    shuffled = records[:]
    rng.shuffle(shuffled)
    got, _ = finetune_cot(shuffled, max_per_question=2)
    assert sorted(kept_keys(got)) == sorted(kept_keys(expected))


def test_repeated_sample_is_refused():
    with pytest.raises(ValueError, match="twice"):
        finetune_cot([rec("q", 0, "A", "A"), rec("q", 0, "A", "A")])


# ----------------------------------------------------------------------------------------------
# Diversity


def test_jaccard_distance():
    assert jaccard_distance(frozenset("ab"), frozenset("ab")) == 0.0
    assert jaccard_distance(frozenset("ab"), frozenset("cd")) == 1.0
    assert jaccard_distance(frozenset("abc"), frozenset("bcd")) == pytest.approx(0.5)
    assert jaccard_distance(frozenset(), frozenset()) == 0.0


def test_choose_diverse_farthest_first():
    texts = ["a b c d", "a b c e", "x y z w", "a b c d f"]
    # d(0,1)=0.4, d(0,2)=1, d(0,3)=0.2, d(2,1)=d(2,3)=1: 0 then 2 (farthest), then 1 (0.4 > 0.2).
    assert choose_diverse(texts, 2) == [0, 2]
    assert choose_diverse(texts, 3) == [0, 1, 2]
    assert choose_diverse(texts, 0) == [0, 1, 2, 3] == choose_diverse(texts, 9)
    # Case and punctuation do not make words different.
    assert choose_diverse(["The cat.", "the CAT", "dog"], 2) == [0, 2]


def test_choose_diverse_ties_go_to_the_lower_index():
    assert choose_diverse(["a", "b", "c", "d"], 2) == [0, 1]
    assert choose_diverse(["a", "a b", "a c"], 2) == [0, 1]


def test_choose_diverse_is_at_least_as_spread_as_the_first_k():
    """Over random texts, the greedy choice's closest pair is never closer than the first k samples'
    closest pair would be for k = 2 (greedy picks the farthest from sample 0, an optimum given it)."""
    rng = random.Random(1)
    for _ in range(50):
        texts = [" ".join(rng.choices("abcdefghij", k=rng.randint(1, 6))) for _ in range(rng.randint(3, 8))]
        words = [frozenset(t.split()) for t in texts]
        i, j = choose_diverse(texts, 2)
        assert i == 0
        assert jaccard_distance(words[0], words[j]) == max(jaccard_distance(words[0], w) for w in words[1:])


# ----------------------------------------------------------------------------------------------
# Self-consistency


def test_majority():
    assert majority(["A", "B", "A", None]) == ("A", 2, False)
    assert majority(["B", "A", "A", "B"]) == ("B", 2, True)
    assert majority([None, None]) == (None, 0, False)


@pytest.mark.parametrize("threshold, kept", [(0.6, True), (0.61, False), (0.2, True)])
def test_threshold_boundary_is_inclusive(threshold, kept):
    records = [rec("q", s, a) for s, a in enumerate("AAABC")]  # agreement 3/5 = 0.6
    got, report = self_consistency(records, threshold=threshold)
    if kept:
        assert kept_keys(got) == [("q", 0), ("q", 1), ("q", 2)]
        assert report["dropped_records"] == {"disagrees with majority": 2}
    else:
        assert got == [] and report["dropped_questions"] == {"below threshold": 1}
        assert report["dropped_records"] == {"below threshold": 5}
    check_sums(report)


def test_unanswered_samples_count_in_the_agreement_denominator():
    records = [rec("q", 0, "7"), rec("q", 1, "7"), rec("q", 2, None), rec("q", 3, None)]  # 2/4
    assert self_consistency(records, threshold=0.6)[1]["dropped_questions"] == {"below threshold": 1}
    kept, report = self_consistency(records, threshold=0.5)
    assert kept_keys(kept) == [("q", 0), ("q", 1)]
    assert report["dropped_records"] == {"no answer extracted": 2}


def test_tied_majority_is_dropped_even_above_threshold():
    records = [rec("q", s, a) for s, a in enumerate("AABB")]
    kept, report = self_consistency(records, threshold=0.0)
    assert kept == [] and report["dropped_questions"] == {"tied majority": 1}
    check_sums(report)


def test_kept_answer_is_the_majority_not_the_gold():
    records = [rec("q", s, a, gold="B") for s, a in enumerate("AAB")]
    kept, report = self_consistency(records, threshold=0.5)
    assert [r["answer"] for r in kept] == ["A", "A"]
    assert [r["gold"] for r in kept] == ["B", "B"]
    assert report["pseudo_labels"] == {"accuracy_kept": 0.0, "n_kept": 1, "accuracy_all": 0.0, "n_all": 1}


def test_perturbation_keeps_consistent_and_drops_changed_questions():
    records = [
        rec("stable", 0, "A"), rec("stable", 1, "A"), rec("stable", 2, "A", perturbed=True),
        rec("flips", 0, "A"), rec("flips", 1, "A"), rec("flips", 2, "A", perturbed=True),
        rec("flips", 3, "C", perturbed=True),
        rec("silent", 0, "B"), rec("silent", 1, "B"), rec("silent", 2, None, perturbed=True),
        rec("unchecked", 0, "D"), rec("unchecked", 1, "D"),
    ]
    kept, report = self_consistency(records, threshold=0.6, perturbation=True)
    assert kept_keys(kept) == [("stable", 0), ("stable", 1)]
    assert report["dropped_questions"] == {"changed under perturbation": 2, "no perturbed sample": 1}
    assert report["dropped_records"] == {"perturbed sample": 4, "changed under perturbation": 4,
                                         "no perturbed sample": 2}
    check_sums(report)
    # Without the check, perturbed samples are only ignored: every question is kept.
    kept, report = self_consistency(records, threshold=0.6, perturbation=False)
    assert {r["id"] for r in kept} == {"stable", "flips", "silent", "unchecked"}
    assert report["dropped_records"] == {"perturbed sample": 4}


def test_perturbation_without_perturbed_samples_names_the_fix():
    with pytest.raises(FirstKDError, match="--perturb shuffle-options"):
        self_consistency([rec("q", 0, "A"), rec("q", 1, "A")], perturbation=True)


def test_pseudo_label_accuracy_kept_versus_all():
    records = (
        [rec("q1", s, "A", "A") for s in range(4)]                                   # 1.0, right: kept
        + [rec("q2", s, a, "C") for s, a in enumerate("BBBA")]                       # 0.75, wrong: kept
        + [rec("q3", s, a, "A") for s, a in enumerate(["A", "A", "B", None])]         # 0.5, right
        + [rec("q4", s, a, "B") for s, a in enumerate("CCDB")]                       # 0.5, wrong
        + [rec("q5", s, None, "A") for s in range(4)]                                 # no answer: not counted
        + [rec("q6", s, a, "B") for s, a in enumerate("ABAB")]                       # tie -> first seen A, wrong
        + [rec("q7", s, "A") for s in range(4)]                                       # no gold: not counted
    )
    kept, report = self_consistency(records, threshold=0.6)
    assert sorted({r["id"] for r in kept}) == ["q1", "q2", "q7"]
    assert report["pseudo_labels"] == {"accuracy_kept": 0.5, "n_kept": 2, "accuracy_all": 0.4, "n_all": 5}
    assert report["dropped_questions"] == {"below threshold": 2, "no answer extracted": 1, "tied majority": 1}
    check_sums(report)
    assert "pseudo_labels" not in self_consistency([rec("q", 0, "A")])[1]


def test_self_consistency_cap_and_duplicates():
    records = [rec("q", 0, "A", rationale=" red blue"), rec("q", 1, "A", rationale=" red  blue"),
               rec("q", 2, "A", rationale=" red blue green"), rec("q", 3, "A", rationale=" cat dog"),
               rec("q", 4, "A", rationale=" cat dog 2", finished=False)]
    kept, report = self_consistency(records, threshold=0.6, max_per_question=2)
    assert kept_keys(kept) == [("q", 0), ("q", 3)]
    assert report["dropped_records"] == {"duplicate rationale": 1, "over max per question": 1,
                                         "unfinished rationale": 1}
    kept, _ = self_consistency(records, threshold=0.6, drop_unfinished=False)
    assert ("q", 4) in kept_keys(kept)


@pytest.mark.parametrize("seed", range(4))
def test_reports_add_up_and_kept_records_obey_the_rules(seed):
    rng = random.Random(seed)
    records = []
    for q in range(25):
        gold = rng.choice(["A", "B", None])
        n = rng.randint(1, 6)
        for s in range(n + rng.randint(0, 2)):
            records.append(rec(f"q{q}", s, rng.choice(["A", "A", "B", "C", None]), gold,
                               rationale=" " + " ".join(rng.choices("abcdef", k=3)),
                               perturbed=s >= n, finished=rng.random() > 0.1))
    by_key = {(r["id"], r["sample"]): r for r in records}
    for cap in (0, 1, 2):
        for kept, report in (finetune_cot(records, cap),
                             self_consistency(records, rng.choice([0.3, 0.5, 0.7]), cap, perturbation=True)):
            check_sums(report)
            assert report["records_in"] == len(records) and report["questions_in"] == 25
            assert report["records_kept"] == len(kept)
            for r in kept:
                source = by_key[(r["id"], r["sample"])]
                assert not source["perturbed"] and source["finished"] and source["answer"] == r["answer"]
                if report["method"] == "finetune-cot":
                    assert r["answer"] == r["gold"]
            per_question = {}
            for r in kept:
                per_question.setdefault(r["id"], []).append(" ".join(r["rationale"].split()))
            for texts in per_question.values():
                assert len(set(texts)) == len(texts)
                assert cap == 0 or len(texts) <= cap


# ----------------------------------------------------------------------------------------------
# Training records


def test_training_records_rationale_and_final_answer_only():
    kept = [rec("q1", 0, "B", "B"), rec("q1", 2, "B", "B"), rec("q2", 1, "7", None)]
    rows = to_training_records(kept)
    assert [r["id"] for r in rows] == ["q1#0", "q1#2", "q2#1"]
    assert rows[0] == {"id": "q1#0", "question_id": "q1", "prompt": kept[0]["prompt"],
                       "response": kept[0]["rationale"], "answer": "B", "gold": "B"}
    short = to_training_records(kept, final_answer_only=True, answer_template=" = {answer}", cue=CUE)
    assert short == [
        {"id": "q1", "question_id": "q1", "prompt": "Question: q1?\nAnswer:", "response": " = B", "answer": "B",
         "gold": "B"},
        {"id": "q2", "question_id": "q2", "prompt": "Question: q2?\nAnswer:", "response": " = 7", "answer": "7",
         "gold": None}]
    # No cue given: the prompt stays as generated.
    assert to_training_records(kept, True)[0]["prompt"] == kept[0]["prompt"]


@pytest.mark.parametrize("prompt", ["Question: x?\nAnswer:", "Q?\n", "Solve 2+2.\n\n", "x"])
def test_strip_cue_undoes_with_cue(prompt):
    assert strip_cue(with_cue(prompt, CUE), CUE) == prompt
    assert strip_cue(prompt, CUE) is None


# ----------------------------------------------------------------------------------------------
# The command


def labelled_records():
    records = []
    for q in range(4):
        gold = "AB"[q % 2]
        for s, a in enumerate([gold, gold, "C", None]):
            records.append(rec(f"q{q}", s, a, gold, rationale=f" First, step {s} of {q}.\nThe answer is {a}."))
    return records


def test_cli_finetune_cot_output_is_read_by_prepare_dataset(tmp_path, tiny_tokenizer, capsys):
    gen = write_jsonl(tmp_path / "gen.jsonl", labelled_records())
    out = tmp_path / "sub" / "train.jsonl"
    assert main(["filter", str(gen), "--method", "finetune-cot", "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [f"q{q}#{s}" for q in range(4) for s in (0, 1)]
    report = json.loads((tmp_path / "sub" / "train.filter.json").read_text())
    assert (report["records_kept"], report["records_written"], report["questions_kept"]) == (8, 8, 4)
    assert report["dropped_records"] == {"no answer extracted": 4, "wrong answer": 4}
    printed = capsys.readouterr().out
    assert "kept 8/16 samples of 4/4 questions" in printed and "wrong answer 4" in printed

    ds, info = prepare_dataset(DataConfig(data=str(out), format="prompt-response", max_length=256), tiny_tokenizer)
    assert info["format"] == "prompt-response" and ds["id"] == [r["id"] for r in rows]
    for row, ids, start in zip(rows, ds["input_ids"], ds["target_start"]):
        assert ids[:start] == tiny_tokenizer(row["prompt"])["input_ids"]
        expected = tiny_tokenizer.encode(row["response"], add_special_tokens=False) + [tiny_tokenizer.eos_token_id]
        assert ids[start:] == expected


def test_cli_self_consistency_final_answer_only_unlabelled(tmp_path, tiny_tokenizer, capsys):
    records = [rec(f"q{q}", s, a) for q, answers in enumerate(["AAAB", "ABCD", "BBBB"])
               for s, a in enumerate(answers)]
    gen = write_jsonl(tmp_path / "gen.jsonl", records)
    out = tmp_path / "train.jsonl"
    assert main(["filter", str(gen), "--method", "self-consistency", "--final-answer-only",
                 "--out", str(out), "--answer-template", "\\nAnswer: {answer}"]) == 0
    rows = read_jsonl(out)
    assert rows == [
        {"id": "q0", "question_id": "q0", "prompt": "Question: q0?\nAnswer:", "response": "\nAnswer: A",
         "answer": "A", "gold": None},
        {"id": "q2", "question_id": "q2", "prompt": "Question: q2?\nAnswer:", "response": "\nAnswer: B",
         "answer": "B", "gold": None}]
    assert "pseudo-label" not in capsys.readouterr().out
    ds, _ = prepare_dataset(DataConfig(data=str(out), format="prompt-response"), tiny_tokenizer)
    assert ds["id"] == ["q0", "q2"]


def test_cli_reports_pseudo_label_accuracy(tmp_path, capsys):
    records = [rec(f"q{q}", s, a, gold) for q, (answers, gold) in enumerate([("AAAB", "A"), ("ABBC", "A")])
               for s, a in enumerate(answers)]
    gen = write_jsonl(tmp_path / "gen.jsonl", records)
    assert main(["filter", str(gen), "--method", "self-consistency", "--out", str(tmp_path / "t.jsonl")]) == 0
    assert "100.0% over 1 kept questions, 50.0% over all 2" in capsys.readouterr().out
    report = json.loads((tmp_path / "t.filter.json").read_text())
    assert report["pseudo_labels"] == {"accuracy_kept": 1.0, "n_kept": 1, "accuracy_all": 0.5, "n_all": 2}


def _bad_json(tmp):
    path = write_jsonl(tmp / "gen.jsonl", labelled_records()[:3])
    path.write_text(path.read_text() + '{"id": "q9", "sam\n')
    return [str(path)]


def _bad_json_in_the_middle(tmp):
    path = write_jsonl(tmp / "gen.jsonl", labelled_records()[:4])
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1] + ['{"id": "q0", "sample": 1, "prompt": oops}\n'] + lines[2:]))
    return [str(path)]


def _directory(tmp):
    (tmp / "gen").mkdir()
    write_jsonl(tmp / "gen" / "train.jsonl", labelled_records())
    return [str(tmp / "gen")]


def _partial(tmp):
    return [str(write_jsonl(tmp / "gen.jsonl.partial", labelled_records()))]


def _partial_beside(tmp):
    write_jsonl(tmp / "gen.jsonl.partial", labelled_records())
    return [str(tmp / "gen.jsonl")]


def _missing_field(tmp):
    records = labelled_records()
    del records[2]["rationale"]
    return [str(write_jsonl(tmp / "gen.jsonl", records))]


def _gen(tmp, records=None):
    return [str(write_jsonl(tmp / "gen.jsonl", records or labelled_records()))]


CLI_ERRORS = {
    "missing input": (lambda t: [str(t / "nope.jsonl")], ["--method", "finetune-cot"], "not found"),
    "bad json": (_bad_json, ["--method", "finetune-cot"], "line 4"),
    "bad json in the middle": (_bad_json_in_the_middle, ["--method", "finetune-cot"],
                               "gen.jsonl line 2 is not valid JSON (Expecting value); fix or remove the line"),
    "input is a directory": (_directory, ["--method", "finetune-cot"],
                             "is a directory (it holds train.jsonl); pass the jsonl file written by `first-kd "
                             "generate`, e.g."),
    "unfinished generate": (_partial, ["--method", "finetune-cot"], "re-run the same generate"),
    "partial beside": (_partial_beside, ["--method", "finetune-cot"], "unfinished"),
    "missing field": (_missing_field, ["--method", "finetune-cot"], "line 3 lacks field(s) rationale"),
    "filter output as input": (
        lambda t: [str(write_jsonl(t / "gen.jsonl", to_training_records(labelled_records())))],
        ["--method", "finetune-cot"], "filter output"),
    "no method": (_gen, [], "--method"),
    "template without answer": (_gen, ["--method", "finetune-cot", "--answer-template", "The end."], "{answer}"),
    "perturbation with finetune-cot": (_gen, ["--method", "finetune-cot", "--perturbation"], "self-consistency"),
    "no perturbed samples": (_gen, ["--method", "self-consistency", "--perturbation"], "--perturb shuffle-options"),
    "threshold out of range": (_gen, ["--method", "self-consistency", "--threshold", "1.5"], "between 0 and 1"),
    "threshold nan": (_gen, ["--method", "self-consistency", "--threshold", "nan"], "between 0 and 1"),
    "nothing kept, unlabelled": (lambda t: _gen(t, [rec("q", 0, "A")]), ["--method", "finetune-cot"],
                                 "use --method self-consistency"),
    "nothing kept, threshold": (lambda t: _gen(t, [rec("q", s, a) for s, a in enumerate("ABC")]),
                                ["--method", "self-consistency"], "lower --threshold"),
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, case, capsys):
    make_input, flags, needle = CLI_ERRORS[case]
    out = tmp_path / "train.jsonl"
    assert main(["filter", *make_input(tmp_path), "--out", str(out), *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("first-kd filter: error:"), err
    assert needle in err[0]
    assert not out.exists() and not (tmp_path / "train.filter.json").exists()


def test_cli_refuses_existing_out_without_overwrite(tmp_path, capsys):
    gen = _gen(tmp_path)
    out = tmp_path / "train.jsonl"
    out.write_text("keep me\n")
    assert main(["filter", *gen, "--method", "finetune-cot", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not a `first-kd filter` output" in err and "--overwrite" in err and out.read_text() == "keep me\n"
    assert main(["filter", *gen, "--method", "finetune-cot", "--out", str(out), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 8


def test_cli_same_command_twice_is_a_no_op_and_other_settings_are_refused(tmp_path, capsys):
    gen = _gen(tmp_path)
    out = tmp_path / "train.jsonl"
    command = ["filter", *gen, "--method", "finetune-cot", "--out", str(out)]
    assert main(command) == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out, tmp_path / "train.filter.json")}
    capsys.readouterr()
    assert main(command) == 0  # a scheduler re-running the finished job
    captured = capsys.readouterr()
    assert "nothing to do" in captured.err and "\n" not in captured.err.strip() and captured.out == ""
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    # other settings on the same output: refused, naming the difference
    assert main([*command, "--max-per-question", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_per_question: 0 -> 1" in err and "--overwrite" in err and "\n" not in err
    # the same flags on another generate output are other settings too
    write_jsonl(Path(gen[0]), labelled_records()[:8])
    assert main(command) == 2
    assert "input_sha256" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == {p: b for p, (b, _) in before.items()}
    assert main([*command, "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 4
    report = json.loads((tmp_path / "train.filter.json").read_text(),
                        parse_constant=lambda token: pytest.fail(f"the report holds {token}"))  # strict JSON
    assert report["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_cli_killed_between_its_two_renames_is_redone_by_the_same_command(tmp_path, monkeypatch, capsys):
    gen = _gen(tmp_path)
    out = tmp_path / "train.jsonl"
    assert main(["filter", *gen, "--method", "finetune-cot", "--out", str(out), "--max-per-question", "1"]) == 0
    old = out.read_bytes()
    command = ["filter", *gen, "--method", "finetune-cot", "--out", str(out), "--overwrite"]

    def crash(name):
        if name == "filter:between-renames":
            raise KeyboardInterrupt  # what a kill leaves: the new report in place, the old output still there
    with monkeypatch.context() as m:
        m.setattr(filters, "crash_point", crash)
        assert main(command) == 130
    assert out.read_bytes() == old
    command.remove("--overwrite")  # the scheduler re-runs the job's command as it was, or without --overwrite
    assert main(command) == 0 and "nothing to do" not in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 8
    assert main(command) == 0 and "nothing to do" in capsys.readouterr().err


def test_cli_output_folder_that_cannot_exist_is_one_line(tmp_path, capsys):
    """Read-only output, simulated without chmod (tests run as root, which ignores permissions): --out under
    a path whose parent is a regular file."""
    gen = _gen(tmp_path)
    (tmp_path / "file").write_text("x\n")
    assert main(["filter", *gen, "--method", "finetune-cot", "--out", str(tmp_path / "file" / "train.jsonl")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is a file, not a folder" in err[0] and "Traceback" not in err[0]


def test_cli_full_disk_keeps_the_finished_output_and_its_report(tmp_path):
    """A full disk, simulated by a file-size limit (writes past it fail with EFBIG) in a subprocess."""
    records = [rec(f"q{q}", s, "A", "A", rationale=f" Step {s} of {q}: " + "words " * 200 + "The answer is A.")
               for q in range(4) for s in range(3)]
    gen = _gen(tmp_path, records)
    out = tmp_path / "train.jsonl"
    assert main(["filter", *gen, "--method", "finetune-cot", "--out", str(out), "--max-per-question", "1"]) == 0
    before = file_bytes(tmp_path)
    limit = len(out.read_bytes()) + 100  # the new output, three times as long, cannot be written

    full = run_cli(["filter", *gen, "--method", "finetune-cot", "--out", str(out), "--overwrite"], limit_bytes=limit)
    assert full.returncode == 2
    err = [line for line in full.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("first-kd filter: error:") and "EFBIG" in err[0], full.stderr
    assert file_bytes(tmp_path) == before  # the old output and report whole, no scratch file left
