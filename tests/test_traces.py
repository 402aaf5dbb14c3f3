"""first_kd.data.traces (Dualformer trace variants) and their expansion in first_kd.data.tokenize_records: the
exact text and ids of the contract, seeded and order-independent step dropping, and one-line errors.

Trace specs (--trace-spec, first_kd.data.trace_spec, configs/traces/): each operation on a constructed A* trace
with its exact output, the built-in specs, the level drawn per (seed, epoch, example id), the targets the
training examples give per epoch, the one-line errors of bad specs and options, the refusals of cache and
distill --store, and distill end to end over epochs, interrupted and resumed."""

from __future__ import annotations

import random
import re

import datasets
import pytest

from first_kd.config import build
from first_kd.data import DataConfig, prepare_dataset, tokenize_records
from first_kd.errors import FirstKDError
from first_kd.data.traces import drop_steps, marker_prefix_ids, parse_levels, split_trace, trace_variants
from helpers import REPO, write_jsonl


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


# ----------------------------------------------------------------------------------------------
# trace specs: the operations on a constructed A* trace (the maze format: create/close X Y cG cH, then plan X Y)

import json
import signal

import yaml

from first_kd.cli import main
from first_kd.data import TraceTargets
from first_kd.data.trace_spec import builtin_specs, load_trace_spec
from first_kd.data.traces import (apply_level, drop_fraction, drop_types, example_rng, spec_variant, split_response,
                                  strip_tokens)
from first_kd.training import DataExamples
from helpers import run_cli

CREATES = ["0 0 c0 c6", "1 0 c1 c5", "0 1 c1 c7", "2 0 c2 c4", "1 1 c2 c6", "3 0 c3 c3", "2 1 c3 c5", "3 1 c4 c2",
           "4 0 c4 c4", "3 2 c5 c1", "4 1 c5 c3", "3 3 c6 c0"]
MAZE = """create 0 0 c0 c6
close 0 0 c0 c6
create 1 0 c1 c5
create 0 1 c1 c7
close 1 0 c1 c5
create 2 0 c2 c4
create 1 1 c2 c6
close 2 0 c2 c4
create 3 0 c3 c3
create 2 1 c3 c5
close 3 0 c3 c3
create 3 1 c4 c2
create 4 0 c4 c4
close 3 1 c4 c2
create 3 2 c5 c1
create 4 1 c5 c3
close 3 2 c5 c1
create 3 3 c6 c0
close 3 3 c6 c0
plan 0 0
plan 1 0
plan 2 0
plan 3 0
plan 3 1
plan 3 2
plan 3 3"""
PLAN = ["plan 0 0", "plan 1 0", "plan 2 0", "plan 3 0", "plan 3 1", "plan 3 2", "plan 3 3"]
ASTAR_LEVELS = ["L0", "L1", "L2", "L3", "L4"]


def maze_steps():
    return split_response(load_trace_spec("astar"), MAZE, "\n")


def texts(steps):
    return [text for _, text in steps]


def test_the_astar_spec_types_every_line_and_has_no_answer_line():
    steps, answer = maze_steps()
    assert answer is None and texts(steps) == MAZE.split("\n")
    assert [kind for kind, _ in steps].count("create") == 12
    assert [kind for kind, _ in steps].count("close") == 7 and [kind for kind, _ in steps][-7:] == ["plan"] * 7


def test_drop_types_drops_every_close_clause():
    steps, _ = maze_steps()
    assert texts(drop_types(steps, ["close"])) == [f"create {c}" for c in CREATES] + PLAN


def test_strip_tokens_strips_the_cost_tokens_leaving_create_x_y():
    steps, _ = maze_steps()
    stripped = strip_tokens(drop_types(steps, ["close"]), {"create": r" c\d+"})
    assert texts(stripped) == [f"create {c[:3]}" for c in CREATES] + PLAN
    assert texts(stripped)[:3] == ["create 0 0", "create 1 0", "create 0 1"]
    # a type without a pattern is left as written
    assert texts(strip_tokens(steps, {"create": r" c\d+"}))[1] == "close 0 0 c0 c6"


def test_drop_fraction_drops_30_percent_of_the_creates_seeded():
    steps, _ = maze_steps()
    l2 = strip_tokens(drop_types(steps, ["close"]), {"create": r" c\d+"})
    kept = drop_fraction(l2, "create", 0.3, random.Random("maze:7"))
    # the exact kept set for this seed: round(0.3 * 12) = 4 of the 12 creates dropped, order kept, plans untouched
    assert texts(kept) == ["create 0 0", "create 1 0", "create 0 1", "create 1 1", "create 2 1", "create 3 1",
                           "create 4 0", "create 4 1"] + PLAN
    assert texts(drop_fraction(l2, "create", 0.3, random.Random("maze:7"))) == texts(kept)  # reproducible


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 10, 12, 15])
def test_drop_fraction_drops_round_of_the_fraction_of_one_type_only(n):
    steps = [(kind, f"{kind} {i} 0") for i in range(n) for kind in ("create", "close")]
    kept = drop_fraction(steps, "create", 0.3, random.Random(f"n:{n}"))
    assert sum(kind == "create" for kind, _ in kept) == n - round(0.3 * n)
    assert [s for s in kept if s[0] == "close"] == [s for s in steps if s[0] == "close"]
    assert kept == [s for s in steps if s in kept]  # a subsequence, in order
    with pytest.raises(ValueError):
        drop_fraction(steps, "create", 1.5, random.Random(0))


def test_astar_levels_compose_the_operations_exactly():
    spec = load_trace_spec("astar")
    steps, _ = maze_steps()
    got = {level.name: texts(apply_level(steps, level, spec, random.Random("maze:7"))) for level in spec.levels}
    assert got["L0"] == MAZE.split("\n")
    assert got["L1"] == [f"create {c}" for c in CREATES] + PLAN
    assert got["L2"] == [f"create {c[:3]}" for c in CREATES] + PLAN
    assert got["L3"] == ["create 0 0", "create 1 0", "create 0 1", "create 1 1", "create 2 1", "create 3 1",
                         "create 4 0", "create 4 1"] + PLAN
    assert got["L4"] == PLAN  # drop everything: the plan lines only
    assert [spec.is_fast(level) for level in spec.levels] == [False, False, False, False, True]


def test_dropping_everything_gives_the_plan_lines_with_the_fast_marker(tiny_tokenizer):
    cfg = DataConfig(trace_spec="astar", trace_probs="0,0,0,0,1")
    targets = TraceTargets(tiny_tokenizer, cfg)
    assert targets.variant("m0", MAZE, 3) == ("L4", "[fast]", "\n".join(PLAN))
    ids = targets.target_ids("m0", MAZE, 3)
    fast = marker_prefix_ids(tiny_tokenizer, "[fast]", "\n")
    assert ids[: len(fast)] == fast and ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[:-1]) == "[fast]\n" + "\n".join(PLAN)
    full = TraceTargets(tiny_tokenizer, DataConfig(trace_spec="astar", trace_probs="1,0,0,0,0"))
    assert full.variant("m0", MAZE, 3) == ("L0", "[slow]", MAZE)


# ----------------------------------------------------------------------------------------------
# the built-in specs (configs/traces/*.yaml)


@pytest.mark.parametrize("name", ["astar", "steps"])
def test_builtin_spec_files_open_with_their_command_and_load(name):
    path = REPO / "configs" / "traces" / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# first-kd distill ") and f"--trace-spec {name}" in first, first
    spec = load_trace_spec(name)
    assert spec.name == name and spec.path == str(path) and len(spec.sha256) == 64
    assert abs(sum(spec.default_probs) - 1) < 1e-9
    assert load_trace_spec(str(path)) == spec  # a built-in name and its file are the same spec


def test_builtin_specs_are_the_shipped_files():
    assert builtin_specs() == sorted(p.stem for p in (REPO / "configs" / "traces").glob("*.yaml"))
    assert {"astar", "steps"} <= set(builtin_specs())
    astar = load_trace_spec("astar")
    assert astar.level_names == ASTAR_LEVELS and astar.separator == "\n"
    assert astar.trace_types == ("create", "close") and astar.kept == ("plan",) and not astar.answer_last
    assert astar.default_probs == [0.45, 0.1, 0.1, 0.1, 0.25]


def test_the_steps_spec_reproduces_the_fixed_levels():
    """The steps spec's levels full / drop50 / fast are --trace-levels 0,0.5,1: with the generator a fixed level
    uses, each gives exactly that variant's text (steps dropped, answer line kept, marker)."""
    spec = load_trace_spec("steps")
    assert spec.level_names == ["full", "drop50", "fast"] and spec.answer_last and spec.separator is None
    for rid, n in [("q7", 4), ("a", 0), ("b", 1), ("c", 5), ("d", 8)]:
        response = steps_response(n) + "\n\n"
        fixed = dict(trace_variants(rid, response, [0.0, 0.5, 1.0], seed=3, sep="\n"))
        steps, answer = split_response(spec, response, "\n")
        for level, value, suffix in zip(spec.levels, (0.0, 0.5, 1.0), ("full", "drop50", "fast")):
            kept = texts(apply_level(steps, level, spec, random.Random(f"3:{rid}:{value}"))) + [answer]
            marker = "[fast]" if spec.is_fast(level) else "[slow]"
            assert marker + "\n" + "\n".join(kept) == fixed[f"{rid}#{suffix}"]


# ----------------------------------------------------------------------------------------------
# the level drawn per (seed, epoch, example id)


def test_the_level_sequence_differs_across_epochs_and_is_reproducible():
    spec = load_trace_spec("astar")
    probs = spec.default_probs

    def sequence(rid, seed, epochs=40):
        return [spec_variant(spec, probs, rid, MAZE, seed, epoch, "\n")[0].name for epoch in range(epochs)]

    one = sequence("m3", seed=0)
    assert len(set(one)) >= 3  # the same example is seen at several levels over the epochs
    assert sequence("m3", seed=0) == one  # a pure function of (seed, epoch, id)
    assert sequence("m3", seed=1) != one and sequence("m4", seed=0) != one
    # the random part of an operation is drawn again too: L3 keeps other creates in other epochs
    l3 = {tuple(spec_variant(spec, [0, 0, 0, 1, 0], "m3", MAZE, 0, epoch, "\n")[1]) for epoch in range(10)}
    assert len(l3) > 1 and all(len(kept) == 8 + 7 for kept in l3)
    # Cat(p): over many examples each level comes about as often as its probability says
    draws = [spec_variant(spec, probs, f"r{i}", MAZE, 0, 0, "\n")[0].name for i in range(4000)]
    for name, p in zip(ASTAR_LEVELS, probs):
        assert abs(draws.count(name) / len(draws) - p) < 0.03, (name, draws.count(name))
    assert example_rng(0, 1, "m3").random() == example_rng(0, 1, "m3").random()


MAZE_RECORDS = [{"id": f"m{i}", "prompt": f"maze {i}: from 0 0 to 3 3\n", "response": MAZE} for i in range(6)]


def traced_examples(tok, records, **options):
    cfg = DataConfig(trace_spec="astar", **options)
    dataset, info = tokenize_records(datasets.Dataset.from_list(records), tok, cfg)
    return DataExamples(dataset, TraceTargets(tok, cfg)), dataset, info


def test_the_examples_give_another_target_each_epoch_and_the_dataset_holds_epoch_0(tiny_tokenizer):
    tok = tiny_tokenizer
    examples, dataset, info = traced_examples(tok, MAZE_RECORDS, trace_seed=2)
    assert len(dataset) == len(MAZE_RECORDS) and dataset["id"] == [r["id"] for r in MAZE_RECORDS]
    assert dataset["response"] == [MAZE] * len(MAZE_RECORDS)
    assert info["trace_spec"]["name"] == "astar" and info["trace_spec"]["levels"] == ASTAR_LEVELS
    assert info["trace_spec"]["probs"] == [0.45, 0.1, 0.1, 0.1, 0.25] and info["trace_levels"] is None
    slow, fast = marker_prefix_ids(tok, "[slow]", "\n"), marker_prefix_ids(tok, "[fast]", "\n")
    differ = 0
    for i in range(len(examples)):
        e0, e1 = examples.example(i, 0), examples.example(i, 1)
        assert e0["input_ids"].tolist() == examples[i]["input_ids"].tolist()  # the dataset row is the epoch-0 draw
        start = int(dataset[i]["target_start"])
        assert e0["input_ids"][:start].tolist() == e1["input_ids"][:start].tolist()  # the prompt, tokenized once
        differ += e0["input_ids"].tolist() != e1["input_ids"].tolist()
        for epoch, ex in ((0, e0), (1, e1)):
            level, marker, text = examples.trace.variant(f"m{i}", MAZE, epoch)
            target = ex["input_ids"][start:].tolist()
            assert target == (fast if level == "L4" else slow) + tok(text, add_special_tokens=False)["input_ids"] + [
                tok.eos_token_id]
            assert ex["target_positions"].tolist() == list(range(start - 1, len(ex["input_ids"]) - 1))
    assert differ > 0  # some example is trained on another trace in epoch 1 than in epoch 0
    # without a trace (validation), the examples are the epoch-0 draw whatever the epoch
    fixed = DataExamples(dataset)
    assert all(fixed.example(i, 5)["input_ids"].tolist() == examples.example(i, 0)["input_ids"].tolist()
               for i in range(len(fixed)))


def test_an_examples_draw_does_not_depend_on_the_other_examples(tiny_tokenizer):
    alone, _, _ = traced_examples(tiny_tokenizer, [MAZE_RECORDS[3]])
    mixed, _, _ = traced_examples(tiny_tokenizer, [MAZE_RECORDS[5], MAZE_RECORDS[1], MAZE_RECORDS[3]])
    for epoch in range(8):
        assert alone.example(0, epoch)["input_ids"].tolist() == mixed.example(2, epoch)["input_ids"].tolist()


def test_a_long_trace_is_cut_to_max_length_like_tokenize_records(tiny_tokenizer):
    examples, dataset, info = traced_examples(tiny_tokenizer, MAZE_RECORDS[:2], max_length=40,
                                              trace_probs="1,0,0,0,0")
    assert info["n_truncated"] == 2
    for i in range(2):
        assert len(examples.example(i, 4)["input_ids"]) == 40 == len(dataset[i]["input_ids"])


# ----------------------------------------------------------------------------------------------
# one-line errors: options, spec files, records, commands


@pytest.mark.parametrize("values, message", [
    ({"trace_spec": "astar", "trace_levels": "0,1"}, "--trace-spec and --trace-levels both"),
    ({"trace_probs": "0.5,0.5"}, "add --trace-spec"),
    ({"trace_spec": "astar", "trace_probs": "0.5,0.5"}, "2 probabilities for 5 levels (L0, L1, L2, L3, L4)"),
    ({"trace_spec": "astar", "trace_probs": "1.2,-0.2,0,0,0"}, "probability -0.2 is negative"),
    ({"trace_spec": "astar", "trace_probs": "0.2,0.2,0.2,0.2,0.1"}, "sum to 0.9, not 1"),
    ({"trace_spec": "astar", "trace_probs": "a,b,c,d,e"}, "one number per level"),
    ({"trace_spec": "maze"}, "--trace-spec maze: no such file and no built-in spec of that name (built-in: astar"),
    ({"trace_spec": "astar", "step_separator": " | "}, "drop --step-separator"),
])
def test_trace_spec_options_are_checked_in_one_line(values, message):
    with pytest.raises(FirstKDError, match=re.escape(message)) as err:
        build(DataConfig, values)
    assert "\n" not in str(err.value)


def test_trace_probs_override_the_spec_within_tolerance():
    from first_kd.data import trace_spec_of

    spec, probs = trace_spec_of(build(DataConfig, {"trace_spec": "astar", "trace_probs": "0.2, 0.2,0.2,0.2,0.2000001"}))
    assert spec.name == "astar" and probs == [0.2, 0.2, 0.2, 0.2, 0.2000001]
    assert trace_spec_of(build(DataConfig, {"trace_spec": "steps", "step_separator": " | "}))[1] == spec_defaults("steps")


def spec_defaults(name):
    return load_trace_spec(name).default_probs


GOOD_SPEC = {"types": {"think": "^think", "say": "^say"}, "strip": {"think": r" \d+"}, "kept": ["say"],
             "levels": [{"name": "all", "p": 0.5}, {"name": "none", "p": 0.5, "ops": ["drop_trace"]}]}


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "colour: unknown key (keys: name, description"),
    ({"types": None}, "types: must be a mapping of step type -> regex"),
    ({"types": {"think": "^(think"}}, "types.think: is not a valid regular expression"),
    ({"kept": ["think", "say"]}, "kept: leaves no trace type"),
    ({"kept": ["talk"]}, "kept: 'talk' is not a step type (think, say)"),
    ({"strip": {"say": " x"}}, "strip: 'say' is not a trace type (think)"),
    ({"levels": []}, "levels: must be a non-empty list"),
    ({"levels": [{"name": "a", "p": 0.5}, {"name": "a", "p": 0.5}]}, "levels[1].name: must be a new identifier"),
    ({"levels": [{"name": "a", "p": 0.5}, {"name": "b", "p": 0.4}]}, "levels[].p: the probabilities sum to 0.9"),
    ({"levels": [{"name": "a", "p": -1}]}, "levels[0].p: must be a probability"),
    ({"levels": [{"name": "a", "p": 1, "ops": [{"drop": "talk"}]}]}, "levels[0].ops[0].drop: 'talk' is not a trace type"),
    ({"levels": [{"name": "a", "p": 1, "ops": [{"drop": "say"}]}]}, "'say' is not a trace type (think)"),
    ({"levels": [{"name": "a", "p": 1, "ops": [{"strip": "say"}]}]}, "is not a type with strip tokens (think)"),
    ({"levels": [{"name": "a", "p": 1, "ops": ["shuffle"]}]}, "levels[0].ops[0]: must be drop_trace or a one-key"),
    ({"levels": [{"name": "a", "p": 1, "ops": [{"drop_fraction": {"type": "think", "fraction": 2}}]}]},
     "drop_fraction.fraction: must be a number in [0, 1], got 2"),
    ({"levels": [{"name": "a", "p": 1, "ops": [{"drop_fraction": {"type": "think"}}]}]},
     "must be a mapping {type: TYPE, fraction: F}"),
    ({"last_is_answer": "yes"}, "last_is_answer: must be true or false"),
])
def test_bad_spec_files_are_one_line_errors_naming_the_key(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**GOOD_SPEC, **change}, sort_keys=False))
    with pytest.raises(FirstKDError, match=re.escape(message)) as err:
        build(DataConfig, {"trace_spec": str(path)})
    assert str(err.value).startswith(f"trace spec {path}: ") and "\n" not in str(err.value)


def test_a_good_spec_file_and_a_broken_one(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(GOOD_SPEC, sort_keys=False))
    spec = load_trace_spec(str(path))
    assert spec.name == "mine" and spec.trace_types == ("think",) and [spec.is_fast(lv) for lv in spec.levels] == [
        False, True]
    steps, answer = split_response(spec, "think 1 2\nsay hi\nthink 3", "\n")
    assert answer is None and texts(apply_level(steps, spec.levels[1], spec, random.Random(0))) == ["say hi"]
    path.write_text("types: [unclosed\n")
    with pytest.raises(FirstKDError, match=r"mine.yaml line \d+ is not valid YAML"):
        load_trace_spec(str(path))


def test_trace_spec_record_errors_name_the_record(tiny_tokenizer):
    bad = MAZE_RECORDS[:1] + [{"id": "m9", "prompt": "maze", "response": "create 0 0 c0 c1\njump 1 2\nplan 0 0"}]
    with pytest.raises(FirstKDError, match=re.escape("record 1 (id m9): field 'response': step 'jump 1 2' matches "
                                                     "none of the step types (create, close, plan)")):
        tokenize_records(datasets.Dataset.from_list(bad), tiny_tokenizer, DataConfig(trace_spec="astar"))
    mcqa = datasets.Dataset.from_list([{"question": "Which?", "choices": ["a", "b"], "answer": "A"}])
    with pytest.raises(FirstKDError, match="--trace-spec drops reasoning steps of prompt-response data"):
        tokenize_records(mcqa, tiny_tokenizer, DataConfig(trace_spec="astar"))


@pytest.mark.parametrize("args, where", [
    (["cache", "--teacher", "t", "--data", "d.jsonl", "--out", "o.zarr"], "a store holds the teacher's top-k"),
    (["distill", "--student", "s", "--store", "s.zarr", "--out", "o"], "--loss first here trains on --store"),
    (["distill", "--student", "s", "--store", "s.zarr", "--loss", "ce", "--out", "o"], "--loss ce here trains on"),
])
def test_cache_and_distill_from_a_store_refuse_trace_spec(args, where, capsys, tmp_path):
    assert main(args + ["--trace-spec", "astar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trace-spec draws each example's trace again every epoch" in err[0]
    assert where in err[0] and "--trace-levels" in err[0]


# ----------------------------------------------------------------------------------------------
# distill --trace-spec end to end: epochs, an interruption and the resume


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_distill_trace_spec_resumes_exactly_and_records_the_spec(tiny_tokenizer, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from first_kd.tiny import build_llama

    student = build_llama(tmp_path / "student", tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    rng = random.Random(0)
    records = [{"id": f"m{i}", "prompt": f"maze {i}\n",
                "response": "\n".join(rng.sample(MAZE.split("\n")[:19], 6) + PLAN[: rng.randint(2, 7)])}
               for i in range(8)]
    data = write_jsonl(tmp_path / "mazes.jsonl", records)
    spec = tmp_path / "maze-spec.yaml"
    spec.write_text((REPO / "configs" / "traces" / "astar.yaml").read_text())

    def args(out, *more):  # 8 records, 2 a step: 4 steps an epoch, 3 epochs
        return ["distill", "--student", str(student), "--data", str(data), "--loss", "ce", "--trace-spec", str(spec),
                "--trace-seed", "5", "--epochs", "3", "--batch-size", "2", "--lr", "3e-3", "--warmup", "0",
                "--save-every", "2", "--log-every", "1", "--seed", "1", "--out", str(out), *more]

    killed, reference = tmp_path / "killed", tmp_path / "reference"
    first = run_cli(args(killed), env={"OMP_NUM_THREADS": "1", "FIRST_KD_CRASH_AT": "distill:after-checkpoint:6"},
                    timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert main(args(killed)) == 0
    assert "resuming from" in capsys.readouterr().err
    assert main(args(reference)) == 0
    a, b = load_file(str(killed / "model" / "model.safetensors")), load_file(str(reference / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs"
    metrics = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (killed, reference)]
    assert [r["step"] for r in metrics[0]] == list(range(1, 13))
    assert [r["loss"] for r in metrics[0]] == [r["loss"] for r in metrics[1]]

    saved = yaml.safe_load((reference / "config.yaml").read_text())
    assert saved["trace_spec"] == str(spec)
    assert saved["trace_spec_record"] == {"name": "astar", "sha256": load_trace_spec(str(spec)).sha256,
                                          "levels": ASTAR_LEVELS, "probs": [0.45, 0.1, 0.1, 0.1, 0.25]}
    # other probabilities, or the same file edited, are another run: refused in one line like any other option
    capsys.readouterr()
    assert main(args(reference, "--trace-probs", "0.2,0.2,0.2,0.2,0.2")) == 2
    assert "different options" in capsys.readouterr().err
    spec.write_text(spec.read_text().replace("fraction: 0.3", "fraction: 0.4"))
    assert main(args(reference)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different options" in err and "trace_spec_record" in err
