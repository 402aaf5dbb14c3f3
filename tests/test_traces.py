"""first_kd.data.traces (Dualformer trace variants) and their expansion in first_kd.data.tokenize_records: the
exact text and ids of the contract, seeded and order-independent step dropping, and one-line errors."""

from __future__ import annotations

import random
import re

import datasets
import pytest

from first_kd.config import build
from first_kd.data import DataConfig, prepare_dataset, tokenize_records
from first_kd.errors import FirstKDError
from first_kd.data.traces import drop_steps, marker_prefix_ids, parse_levels, split_trace, trace_variants
from helpers import write_jsonl


def steps_response(n_steps: int, answer: str = "The answer is 7.") -> str:
    return "\n".join([f"step {i} of the work" for i in range(n_steps)] + [answer])


# ----------------------------------------------------------------------------------------------
# pure functions


def test_parse_levels_accepts_sorts_and_names_bad_values():
    assert parse_levels("0,0.5,1") == [0.0, 0.5, 1.0]
    assert parse_levels(" 1, 0.25 ,0 ") == [0.0, 0.25, 1.0]  # ascending, spaces ignored
    assert parse_levels("0.3") == [0.3]
    for text, message in [("", "no levels"), ("0,,", "not a number"), ("0,half", "not a number"),
                          ("1.5", "outside [0, 1]"), ("-0.1", "outside [0, 1]"), ("nan", "outside [0, 1]"),
                          ("0.5,0.50", "repeated"), ("0.5,0.501", "same variant id")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_levels(text)


def test_split_trace_drops_empty_pieces_and_keeps_the_last_as_answer():
    assert split_trace("a\n\nb\n  \nThe answer is 3.\n", "\n") == (["a", "b"], "The answer is 3.")
    assert split_trace("The answer is 3.", "\n") == ([], "The answer is 3.")
    assert split_trace(" first | second | The answer is 3.", " | ") == ([" first", "second"], "The answer is 3.")
    for response, sep in [("", "\n"), ("\n \n", "\n"), ("a\nb", "")]:
        with pytest.raises(ValueError):
            split_trace(response, sep)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8])
@pytest.mark.parametrize("level", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_drop_steps_drops_round_level_times_n_and_keeps_order(n, level):
    steps = [f"s{i}" for i in range(n)]
    kept = drop_steps(steps, level, random.Random(f"x:{n}:{level}"))
    assert len(steps) - len(kept) == round(level * n)
    assert kept == [s for s in steps if s in kept]  # a subsequence, in order
    with pytest.raises(ValueError):
        drop_steps(steps, 1.5, random.Random(0))


def test_variants_follow_the_contract_exactly():
    response = steps_response(4)
    steps, answer = split_trace(response, "\n")
    got = trace_variants("q7", response, [0.0, 0.5, 1.0], seed=3, sep="\n")
    assert [vid for vid, _ in got] == ["q7#full", "q7#drop50", "q7#fast"]
    assert got[0][1] == "[slow]\n" + response  # level 0: the whole trace
    assert got[2][1] == "[fast]\nThe answer is 7."  # level 1: the answer line only
    # level 0.5: the contract's own recipe, written out here independently
    dropped = set(random.Random("3:q7:0.5").sample(range(4), 2))
    assert got[1][1] == "[slow]\n" + "\n".join([s for i, s in enumerate(steps) if i not in dropped] + [answer])
    assert [vid for vid, _ in trace_variants("q7", response, [0.3333], 0, "\n")] == ["q7#drop33"]


def test_variants_are_seeded_and_independent_of_order_and_of_other_levels():
    records = {f"r{i}": steps_response(6) for i in range(30)}
    one = {rid: trace_variants(rid, text, [0.5], seed=1, sep="\n") for rid, text in records.items()}
    # again, records in the reverse order, with other levels around it
    for rid in reversed(list(records)):
        again = dict(trace_variants(rid, records[rid], [0.0, 0.25, 0.5, 1.0], seed=1, sep="\n"))
        assert again[f"{rid}#drop50"] == one[rid][0][1]
    # the drops depend on the record id and on the seed
    assert len({text for (_, text), in one.values()}) > 5
    other_seed = {rid: trace_variants(rid, text, [0.5], seed=2, sep="\n")[0][1] for rid, text in records.items()}
    assert any(other_seed[rid] != one[rid][0][1] for rid in records)


def test_an_answer_only_response_gives_variants_that_differ_only_in_marker():
    got = trace_variants("a", "The answer is 2.", [0.0, 0.5, 1.0], 0, "\n", "<S>", "<F>")
    assert got == [("a#full", "<S>\nThe answer is 2."), ("a#drop50", "<S>\nThe answer is 2."),
                   ("a#fast", "<F>\nThe answer is 2.")]


# ----------------------------------------------------------------------------------------------
# tokenize_records


PLAIN = [{"id": f"p{i}", "prompt": f"Question: what is the {i} river?\nAnswer:",
          "response": steps_response(i % 4)} for i in range(5)]
ALPACA = [{"instruction": "Name a green thing.", "input": "", "output": "look at a tree\nThe answer is tree."},
          {"instruction": "Say what this is.", "input": "small bird", "output": "The answer is bird."}]


def test_trace_levels_expand_each_record_into_its_variants(tiny_tokenizer):
    tok = tiny_tokenizer
    ds = datasets.Dataset.from_list(PLAIN)
    plain, _ = tokenize_records(ds, tok, DataConfig())
    levels = [0.0, 0.5, 1.0]
    rows, info = tokenize_records(ds, tok, DataConfig(trace_levels="1,0.5,0", trace_seed=4))
    assert len(rows) == len(PLAIN) * len(levels) and len(set(rows["id"])) == len(rows)
    assert info["trace_levels"] == levels and info["n_records"] == len(rows) and info["n_source_records"] == 5
    slow_ids, fast_ids = marker_prefix_ids(tok, "[slow]", "\n"), marker_prefix_ids(tok, "[fast]", "\n")
    for k, rec in enumerate(PLAIN):
        variants = trace_variants(rec["id"], rec["response"], levels, 4, "\n")
        source = plain[k]
        prompt = source["input_ids"][: source["target_start"]]
        for (vid, text), row, level in zip(variants, rows.select(range(3 * k, 3 * k + 3)), levels):
            assert row["id"] == vid
            assert row["input_ids"][: row["target_start"]] == prompt  # the prompt is unchanged
            response = row["input_ids"][row["target_start"]:]
            marker = fast_ids if level == 1 else slow_ids
            assert response[: len(marker)] == marker and response[-1] == tok.eos_token_id
            assert tok.decode(response[:-1]) == text
    # level 1 keeps only the answer line
    assert tok.decode(rows[2]["input_ids"][rows[2]["target_start"]:], skip_special_tokens=True) == \
        "[fast]\nThe answer is 7."


def test_alpaca_output_field_and_custom_separator_and_markers(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    cfg = build(DataConfig, {"data": str(path), "trace_levels": "0,1", "step_separator": "\\n",
                             "slow_marker": "<think>", "fast_marker": "<answer>"})
    rows, info = prepare_dataset(cfg, tiny_tokenizer)
    assert rows["id"] == ["0#full", "0#fast", "1#full", "1#fast"]
    texts = [tiny_tokenizer.decode(r["input_ids"][r["target_start"]:], skip_special_tokens=True) for r in rows]
    assert texts == ["<think>\nlook at a tree\nThe answer is tree.", "<answer>\nThe answer is tree.",
                     "<think>\nThe answer is bird.", "<answer>\nThe answer is bird."]


def test_trace_errors_are_one_line_and_name_the_record(tiny_tokenizer):
    mcqa = datasets.Dataset.from_list([{"question": "Which?", "choices": ["a", "b"], "answer": "A"}])
    with pytest.raises(FirstKDError, match="multiple-choice"):
        tokenize_records(mcqa, tiny_tokenizer, DataConfig(trace_levels="0,1"))
    empty = datasets.Dataset.from_list(PLAIN[:2] + [{"id": "bad", "prompt": "Q?", "response": " \n "}])
    with pytest.raises(FirstKDError, match=r"record 2 \(id bad\): field 'response': the response is empty"):
        tokenize_records(empty, tiny_tokenizer, DataConfig(trace_levels="0,1"))
    twice = datasets.Dataset.from_list(PLAIN[:2] + [dict(PLAIN[0])])
    with pytest.raises(FirstKDError, match=r"record 2 \(id p0#full\): id repeats record 0"):
        tokenize_records(twice, tiny_tokenizer, DataConfig(trace_levels="0,1"))


@pytest.mark.parametrize("values, message", [
    ({"trace_levels": "0,2"}, "--trace-levels '0,2': level 2 is outside"),
    ({"trace_levels": "0,x"}, "not a number"),
    ({"step_separator": ""}, "--step-separator is empty"),
    ({"slow_marker": " "}, "--slow-marker is empty"),
    ({"fast_marker": "[slow]"}, "must differ"),
    ({"slow_marker": "[f", "fast_marker": "[fast]"}, "neither may begin with the other"),
])
def test_config_validation(values, message):
    with pytest.raises(FirstKDError, match=re.escape(message)):
        build(DataConfig, values)
