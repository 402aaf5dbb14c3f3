"""Prompt programs (`first-kd generate --program`, first_kd.programs): the built-in program files, every one run
end to end on a tiny Llama with each stage's prompt checked against its template rendered here from the
record, fan-out, stop strings, resume after kill -9 equal to an uninterrupted run, the swap-answers
perturbation and the filter that keeps exactly the verdicts that survive it, and one-line program-file errors.

Assertions are about structure and exact prompts, never about what a random tiny model happens to write."""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path

import pytest

from first_kd import programs as P
from first_kd.cli import main
from first_kd.commands import generate as G
from first_kd.config import build
from first_kd.errors import FirstKDError
from helpers import REPO, build_peaked_model, read_jsonl, run_cli, write_jsonl

PROGRAM_FILES = sorted((REPO / "configs" / "programs").glob("*.yaml"))
BUILTINS = [p.stem for p in PROGRAM_FILES]
LONG = ["--max-length", "4096", "--max-new-tokens", "6"]  # the program prompts are long in a 512-token vocabulary


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    from first_kd.tiny import build_llama

    root = tmp_path_factory.mktemp("programs")
    model = build_llama(root / "teacher", tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                        max_position_embeddings=4096)
    qa = [{"id": f"qa-{i}", "question": f"How many legs do {i} cats have?", "answer": f"#### {4 * i}"}
          for i in range(3)]
    pairs = [{"id": f"p{i}", "question": f"Which tree is the best {i}?", "answer_a": "the green tree",
              "answer_b": "a stone house", "verdict": v} for i, v in enumerate(["A", "tie", "B"])]
    return {"root": root, "model": str(model), "qa": write_jsonl(root / "qa.jsonl", qa),
            "pairs": write_jsonl(root / "pairs.jsonl", pairs), "rows": {"qa": qa, "pairs": pairs}}


def generate(world, data, out, *extra):
    return main(["generate", "--teacher", world["model"], "--data", str(world[data]), "--out", str(out), *LONG,
                 *extra])


def program_args(name: str) -> tuple[str, list[str]]:
    """(data, options) a built-in program runs with here: bsm judges pairs (answers swapped too)."""
    if name == "bsm":
        return "pairs", ["--program", name, "--perturb", "swap-answers", "--answer-field", "verdict",
                         "--samples", "2", "--temperature", "0.9", "--batch-size", "2"]
    return "qa", ["--program", name, "--samples", "2", "--temperature", "0.9", "--batch-size", "2",
                  "--extractor", "hashes"]


# ----------------------------------------------------------------------------------------------
# An independent rendering of what each record's prompts must be


def fields_of(template: str) -> set[str]:
    return {n for _, n, _, _ in string.Formatter().parse(template) if n is not None}


def expected_prompts(spec: dict, source: dict, rec: dict) -> dict:
    """Each stage's prompt(s) as the program file says, rendered from the data record and the texts the record
    holds for the earlier stages; the fields of a swapped sample see answer_a and answer_b swapped."""
    fields = {**source, "options": ""}
    if rec.get("swapped"):
        fields["answer_a"], fields["answer_b"] = source["answer_b"], source["answer_a"]
    joins = {s["name"]: s.get("join", "\n\n") for s in spec["stages"]}
    out = {}
    for stage in spec["stages"]:
        name, template = stage["name"], stage["template"]
        if "fan_out" in stage:
            over = stage["fan_out"]
            text = rec["stages"][over["over"]]
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()][: over.get("max", 8)] or [text.strip()]
            assert over.get("split", "lines") == "lines"  # the built-in fan-out splits lines
            out[name] = [template.format_map({**fields, "item": item, "n": n}) for n, item in enumerate(lines, 1)]
            fields[name] = joins[name].join(rec["stages"][name])
            fields[f"{name}_prompt"] = joins[name].join(out[name])
        else:
            out[name] = template.format_map(fields)
            fields[name] = rec["stages"][name]
            fields[f"{name}_prompt"] = out[name]
    default_final = spec["stages"][-1]["name"]
    fields["__prompt"] = spec.get("prompt", spec["stages"][0]["template"]).format_map(fields)
    fields["__response"] = spec.get("response", "{" + spec.get("final", default_final) + "}").format_map(fields)
    return {"stages": out, "prompt": fields["__prompt"], "response": fields["__response"]}


# ----------------------------------------------------------------------------------------------
# The built-in program files


@pytest.mark.parametrize("path", PROGRAM_FILES, ids=lambda p: p.name)
def test_builtin_program_files_load_and_name_their_command(path):
    import yaml

    first = path.read_text().splitlines()[0]
    assert first.startswith("# first-kd generate --program ") and f"--program {path.stem} " in first
    program = P.load_program(path.stem)
    assert program.name == path.stem and Path(program.path).resolve() == path.resolve()
    spec = yaml.safe_load(path.read_text())
    assert [s.name for s in program.stages] == [s["name"] for s in spec["stages"]]
    # the command in the opening comment is a valid generate command
    argv = first[len("# first-kd generate "):].split()
    values = {argv[i][2:].replace("-", "_"): argv[i + 1] for i in range(0, len(argv), 2)}
    build(G.GenerateConfig, values)


def test_builtin_prompts_are_worded_after_the_papers():
    stages = {name: [s.template for s in P.load_program(name).stages] for name in BUILTINS}
    assert stages["cot"][0].endswith("A: Let's think step by step.")
    assert stages["cot"][1].endswith("Therefore, the answer is")
    assert stages["rar-1step"] == ["{question}\nRephrase and expand the question, and respond."]
    assert stages["rar-2step"][0] == ("{question}\nGiven the above question, rephrase and expand it to help you do "
                                      "better answering. Maintain all information in the original question.")
    assert fields_of(stages["rar-2step"][1]) == {"question", "rephrased"}
    assert stages["s2a"][0].startswith("Given the following text by a user, extract the part that is unbiased and "
                                       "not their opinion, so that using that text alone would be good context")
    assert '"Question/Query (does not include user bias/preference):"' in stages["s2a"][0]
    assert fields_of(stages["s2a"][1]) == {"context"}  # answered from the rewritten context only
    bsm = P.load_program("bsm")
    assert [s.fan_out is not None for s in bsm.stages] == [False, True, False] and bsm.answers == "verdict"
    assert '"[[A]]"' in stages["bsm"][2] and "[[C]]" in stages["bsm"][2]


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("name", BUILTINS)
def test_each_builtin_program_runs_with_every_prompt_as_its_template_says(tmp_path, world, name):
    import yaml

    data, extra = program_args(name)
    out = tmp_path / "gen.jsonl"
    assert generate(world, data, out, *extra) == 0
    spec = yaml.safe_load((REPO / "configs" / "programs" / f"{name}.yaml").read_text())
    program = P.load_program(name)
    records = read_jsonl(out)
    per_question = 3 if name == "bsm" else 2  # bsm: 2 samples + 1 on the swapped pair
    assert len(records) == 3 * per_question
    sources = {r["id"]: r for r in world["rows"][data]}
    for rec in records:
        want = expected_prompts(spec, sources[rec["id"]], rec)
        assert rec["program"] == name and list(rec["stages"]) == [s.name for s in program.stages]
        assert rec["stage_prompts"] == want["stages"]
        assert rec["prompt"] == want["prompt"] and rec["rationale"] == want["response"]
        assert rec["final"] == rec["stages"][program.final]
        for stage in program.stages:
            texts = rec["stages"][stage.name]
            if stage.fan_out is None:
                assert isinstance(texts, str)
            else:  # one call per item of the plan, as many texts as prompts
                assert isinstance(texts, list) and len(texts) == len(want["stages"][stage.name]) >= 1
        assert rec["n_tokens"] >= 1 and isinstance(rec["finished"], bool)
    if name == "bsm":
        swapped = [r for r in records if r.get("swapped")]
        assert len(swapped) == 3 and all(r["perturbed"] for r in swapped)
        for r in records:
            assert r["answer"] in (None, "A", "B", "tie")
            if r.get("swapped"):
                assert r["answer"] == P.swap_verdict(r["answer_as_shown"])
        assert {r["gold"] for r in records} == {"A", "tie", "B"}
    meta = json.loads((tmp_path / "gen.meta.json").read_text())
    assert meta["settings"]["program"] == {"name": name, "sha256": program.sha256}


@pytest.mark.slow
def test_a_program_run_resumes_after_kill_to_the_uninterrupted_file(tmp_path, world):
    _, extra = program_args("bsm")
    ref = tmp_path / "ref.jsonl"
    assert generate(world, "pairs", ref, *extra, "--batch-size", "1") == 0
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--teacher", world["model"], "--data", str(world["pairs"]), "--out", str(out), *LONG, *extra,
            "--batch-size", "1"]
    killed = run_cli(args, env={"FIRST_KD_CRASH_AT": "generate:after-unit-write:0"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists() and len(read_jsonl(tmp_path / "gen.jsonl.partial")) == 3  # unit 0: 2 + 1 swapped
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "1 of 3 unit(s) already written" in resumed.stdout
    assert out.read_bytes() == ref.read_bytes()


class _Crash(Exception):
    pass


def test_a_changed_program_file_is_not_resumed(tmp_path, world, monkeypatch):
    program = tmp_path / "mine.yaml"
    program.write_text((REPO / "configs" / "programs" / "rar-2step.yaml").read_text())
    out = tmp_path / "gen.jsonl"

    def crash(name):
        if name == "generate:after-unit-write:0":
            raise _Crash(name)

    with monkeypatch.context() as m:
        m.setattr(G, "crash_point", crash)
        with pytest.raises(_Crash):
            generate(world, "qa", out, "--program", str(program), "--batch-size", "1")
    assert len(read_jsonl(tmp_path / "gen.jsonl.partial")) == 1
    program.write_text(program.read_text().replace("(rephrased)", "(rephrased question)"))
    with pytest.raises(FirstKDError, match="other settings.*program") as info:
        G.run_generate(build(G.GenerateConfig, {"teacher": world["model"], "data": str(world["qa"]), "out": str(out),
                                                 "program": str(program), "batch_size": 1, "max_length": 4096,
                                                 "max_new_tokens": 6}))
    assert "\n" not in str(info.value)


def test_fan_out_over_many_items_and_stop_strings_end_to_end(tmp_path, world):
    program = tmp_path / "fan.yaml"
    program.write_text(
        "name: fan\nstages:\n"
        "  - {name: plan, template: 'List: {question}', stop: ['zzz-never']}\n"
        "  - name: each\n    fan_out: {over: plan, split: '(?P<item>\\S)', max: 3}\n"
        "    template: '{n}) {item} of {plan}'\n    join: ' | '\n"
        "  - {name: last, template: '{each} / {each_prompt}', max_new_tokens: 2}\n")
    out = tmp_path / "gen.jsonl"
    assert generate(world, "qa", out, "--program", str(program)) == 0
    spec = P.load_program(str(program))
    for rec in read_jsonl(out):
        plan = rec["stages"]["plan"]
        items = P.split_items(plan, spec.stage("each").fan_out)
        assert items == ([c for c in plan if not c.isspace()][:3] or [plan.strip()])
        assert rec["stage_prompts"]["each"] == [f"{n}) {c} of {plan}" for n, c in enumerate(items, 1)]
        assert rec["stage_prompts"]["last"] == (" | ".join(rec["stages"]["each"]) + " / " +
                                                " | ".join(rec["stage_prompts"]["each"]))


def test_shuffled_options_reach_every_stage_and_answers_map_back(tmp_path, world, capsys):
    from helpers import mcqa_records

    data = write_jsonl(tmp_path / "mc.jsonl", mcqa_records(3, seed=5))
    world = {**world, "mc": data}
    assert generate(world, "mc", tmp_path / "x.jsonl", "--program", "rar-2step", "--perturb", "shuffle-options") != 0
    assert re.search(r"shuffles \{options\}, which no stage of program .*rar-2step", capsys.readouterr().err)
    program = tmp_path / "mc.yaml"
    program.write_text("name: mc\nstages:\n  - {name: think, template: \"Q: {question}\\n{options}\\nA:\"}\n"
                       "  - {name: pick, template: \"{think_prompt}{think}\\nThe answer is\", max_new_tokens: 3}\n"
                       "extractor: '(?P<answer>[A-E])'\n")
    out = tmp_path / "gen.jsonl"
    assert generate(world, "mc", out, "--program", str(program), "--perturb", "shuffle-options",
                    "--perturb-samples", "2") == 0
    records = read_jsonl(out)
    sources = {r["id"]: r for r in mcqa_records(3, seed=5)}
    assert len(records) == 3 * 3
    for rec in records:
        texts = sources[rec["id"]]["choices"]["text"]
        order = rec.get("option_order", list(range(len(texts))))
        lines = "\n".join(f"{'ABCDE'[j]}. {texts[i]}" for j, i in enumerate(order))
        assert rec["stage_prompts"]["think"] == f"Q: {sources[rec['id']]['question']}\n{lines}\nA:"
        assert rec["perturbed"] == ("option_order" in rec)
        shown = G.extract_answer(rec["final"], "(?P<answer>[A-E])")
        assert rec["answer"] == (G.unshuffle_letter(shown, order) if rec["perturbed"] else shown)


# ----------------------------------------------------------------------------------------------
# The pieces (pure)


def test_run_rows_runs_each_stage_as_one_call_with_fan_out_and_stop_strings():
    program_text = ("name: t\nstages:\n  - {name: a, template: 'Q {question}', stop: ['STOP']}\n"
                    "  - name: b\n    fan_out: {over: a, split: lines, max: 2}\n    template: '[{n}:{item}]'\n"
                    "  - {name: c, template: '{b}|{a}'}\nprompt: '{question}?'\nresponse: '{a} => {c}'\n")
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"first-kd-run-rows-{os.getpid()}.yaml"
    path.write_text(program_text)
    try:
        program = P.load_program(str(path))
    finally:
        path.unlink()
    replies = {0: [("x\ny\nz STOP tail", 5, False), ("", 1, True)],
               1: [("b1", 1, True), ("b2", 2, False), ("b3", 1, True)],
               2: [("C0", 3, True), ("C1", 4, True)]}
    calls = []

    def fake(call):
        calls.append((call.index, call.stage.name, list(call.prompts)))
        return replies[call.index]

    rows = P.run_rows(program, [{"question": "one"}, {"question": "two"}], fake)
    assert calls == [(0, "a", ["Q one", "Q two"]), (1, "b", ["[1:x]", "[2:y]", "[1:]"]),
                     (2, "c", ["b1\n\nb2|x\ny\nz", "b3|"])]
    first, second = rows
    assert first.stages == {"a": "x\ny\nz", "b": ["b1", "b2"], "c": "C0"}
    assert first.prompts["b"] == ["[1:x]", "[2:y]"] and first.n_tokens == 5 + 1 + 2 + 3
    assert first.finished is False  # b's second call ran out of budget (a was cut at STOP: finished)
    assert second.finished is True and second.stages["b"] == ["b3"]
    assert (first.prompt, first.response, first.final) == ("one?", "x\ny\nz => C0", "C0")


def test_split_stop_and_verdicts():
    lines = P.FanOut("a", "lines", 2)
    assert P.split_items(" 1. x \n\n 2. y\n3. z", lines) == ["1. x", "2. y"]
    assert P.split_items("  \n ", lines) == [""]
    assert P.split_items("no match", P.FanOut("a", r"\d+", 5)) == ["no match"]
    assert P.split_items("a1 b22 c3", P.FanOut("a", r"[a-z](\d+)", 5)) == ["1", "22", "3"]
    assert P.cut_at_stop("abc\nQ: d", ["\nQ:", "c"]) == ("ab", True)
    assert P.cut_at_stop("abc", ["x"]) == ("abc", False)
    assert [P.normalize_verdict(v) for v in ("a", "[[B]]", "C", "Tie", "D", None, "AB")] == \
        ["A", "B", "tie", "tie", None, None, None]
    assert [P.swap_verdict(v) for v in ("A", "B", "tie", None)] == ["B", "A", "tie", None]


# ----------------------------------------------------------------------------------------------
# The swap-answers filter


def test_the_swap_filter_keeps_exactly_the_verdicts_that_survive_the_swap(tmp_path):
    """Constructed generate records: two plain verdicts per question, one judged on the swapped pair (as written
    under the swap; generate maps it back). A question is kept only when the mapped-back verdict agrees."""
    cases = {  # id: (plain verdicts, verdict as written on the swapped pair, kept?)
        "keeps-a": (["A", "A"], "B", True),
        "keeps-tie": (["tie", "tie"], "tie", True),
        "keeps-b": (["B", "B"], "A", True),
        "position-bias": (["A", "A"], "A", False),   # says "the first one" either way
        "flips-to-tie": (["B", "B"], "tie", False),
        "no-verdict": (["A", "A"], None, False),
    }
    records = []
    for qid, (plain, shown, _) in cases.items():
        for s, v in enumerate(plain):
            records.append({"id": qid, "sample": s, "prompt": f"judge {qid}", "rationale": f"r{s} [[{v}]]",
                            "answer": v, "gold": None, "perturbed": False, "n_tokens": 3, "finished": True,
                            "program": "bsm", "stages": {}})
        records.append({"id": qid, "sample": 2, "prompt": f"judge {qid}", "rationale": "swapped",
                        "answer": P.swap_verdict(shown), "answer_as_shown": shown, "swapped": True, "gold": None,
                        "perturbed": True, "n_tokens": 3, "finished": True, "program": "bsm", "stages": {}})
    gen = write_jsonl(tmp_path / "gen.jsonl", records)
    out = tmp_path / "kept.jsonl"
    assert main(["filter", str(gen), "--method", "self-consistency", "--threshold", "1", "--perturbation",
                 "--final-answer-only", "--answer-template", " {answer}", "--out", str(out)]) == 0
    kept = read_jsonl(out)
    assert [r["id"] for r in kept] == [q for q, (_, _, k) in cases.items() if k]
    for r in kept:  # the program's prompt is kept as it is (no cue to strip), the verdict is the response
        assert r["prompt"] == f"judge {r['id']}" and r["response"] == " " + cases[r["id"]][0][0]
    report = json.loads((tmp_path / "kept.filter.json").read_text())
    assert report["dropped_questions"] == {"changed under perturbation": 3}


# ----------------------------------------------------------------------------------------------
# Refusals: one line each


BAD_PROGRAMS = [
    ("name: x\n", "stages: must be a non-empty list"),
    ("stages: [{name: a, template: 'x'}]\nbogus: 1\n", "bogus: unknown key"),
    ("stages: [{name: a}]\n", r"stages\[0\].template: must be a non-empty string"),
    ("stages: [{name: a, template: 'x', temp: 1}]\n", r"stages\[0\].temp: unknown key"),
    ("stages: [{name: a, template: 'x'}, {name: a, template: 'y'}]\n", r"stages\[1\].name: 'a' is already a stage"),
    ("stages: [{name: 'a b', template: 'x'}]\n", r"stages\[0\].name: must be an identifier"),
    ("stages: [{name: a, template: '{b}'}, {name: b, template: 'y'}]\n", r"stages\[0\].template: names \{b\}, a stage "
                                                                         "that has not run yet"),
    ("stages: [{name: a, template: '{item}'}]\n", r"names \{item\}, which only a fan_out stage has"),
    ("stages: [{name: a, template: 'x {'}]\n", "not a valid template"),
    ("stages: [{name: a, template: '{a.b}'}]\n", "plain fields only"),
    ("stages: [{name: a, template: 'x', temperature: -1}]\n", r"temperature: must be a number >= 0"),
    ("stages: [{name: a, template: 'x', top_p: 0}]\n", r"top_p: must be a number > 0"),
    ("stages: [{name: a, template: 'x', max_new_tokens: 0}]\n", r"max_new_tokens: must be an integer >= 1"),
    ("stages: [{name: a, template: 'x', stop: [1]}]\n", r"stop: must be a string or a list"),
    ("stages: [{name: a, template: 'x', fan_out: {over: z}}]\n", r"fan_out.over: 'z' is not an earlier stage"),
    ("stages: [{name: a, template: 'x'}, {name: b, template: '{item}', fan_out: {over: a, split: '('}}]\n",
     "split: is not a valid regular expression"),
    ("stages: [{name: a, template: 'x'}]\nfinal: b\n", "final: 'b' is not a stage"),
    ("stages: [{name: a, template: 'x'}]\nanswers: letters\n", "answers: must be text or verdict"),
    ("stages: [{name: a, template: 'x'}]\nextractor: '('\n", "extractor: .*valid regular expression"),
    ("stages: [{name: a, template: 'x'}\n", "is not valid YAML"),
    ("- a\n", "must hold a mapping"),
]


@pytest.mark.parametrize("text, message", BAD_PROGRAMS)
def test_program_file_errors_are_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FirstKDError, match=message) as info:
        P.load_program(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("data, options, message", [
    ("qa", ["--program", "nonesuch"], "no built-in program of that name.*bsm, cot"),
    ("qa", ["--program", "bsm", "--cue", "Think."], "--cue is not used with --program"),
    ("qa", ["--perturb", "swap-answers"], "needs a --program whose answers are verdicts"),
    ("qa", ["--program", "cot", "--perturb", "swap-answers"], r"\{answer_a\} and \{answer_b\}, which program"),
    ("pairs", ["--program", "{pairs}", "--perturb", "swap-answers"], "answers: text"),
    ("qa", ["--program", "rar-2step", "--perturb", "shuffle-options"], "multiple-choice data"),
    ("qa", ["--program", "{program}"], r"names \{nothere\}, which is neither a built-in field"),
    ("qa", ["--program", "{clash}"], r"stage output \{answer\} has the name of a field of the data"),
])
def test_bad_program_runs_are_one_line_errors_before_anything_is_written(tmp_path, world, capsys, data, options,
                                                                        message):
    (tmp_path / "p.yaml").write_text("stages: [{name: a, template: '{question} {nothere}'}]\n")
    (tmp_path / "c.yaml").write_text("stages: [{name: answer, template: '{question}'}]\n")
    (tmp_path / "t.yaml").write_text("stages: [{name: j, template: '{question} {answer_a} {answer_b}'}]\n")
    options = [o.format(program=tmp_path / "p.yaml", clash=tmp_path / "c.yaml", pairs=tmp_path / "t.yaml")
               for o in options]
    out = tmp_path / "gen.jsonl"
    assert generate(world, data, out, *options) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["c.yaml", "p.yaml", "t.yaml"]


# ----------------------------------------------------------------------------------------------
# The vLLM engine


@pytest.mark.slow
def test_a_program_runs_on_the_vllm_engine_with_the_same_prompts(tmp_path, tiny_tokenizer):
    """bsm (fan-out, swapped answers) through `--engine vllm` in a subprocess: every stage prompt as its template
    says, and a run killed after its first unit resumes to the bytes of the uninterrupted run."""
    try:
        import vllm  # noqa: F401
    except Exception:
        if os.environ.get("FIRST_KD_REQUIRE_VLLM"):
            raise
        pytest.skip("vLLM is not installed")
    import yaml

    model = build_peaked_model(tmp_path / "teacher", tiny_tokenizer, scale=8.0, hidden_size=64, num_layers=1,
                               num_heads=2, max_position_embeddings=4096)
    pairs = [{"id": f"p{i}", "question": f"Which tree is the best {i}?", "answer_a": "the green tree",
              "answer_b": "a stone house"} for i in range(2)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)

    def run(name, **env):
        out = tmp_path / f"gen-{name}.jsonl"
        return out, run_cli(["generate", "--teacher", str(model), "--data", str(data), "--out", str(out), *LONG,
                             "--program", "bsm", "--perturb", "swap-answers", "--samples", "2", "--temperature",
                             "0.9", "--batch-size", "1", "--engine", "vllm", "--enforce-eager"],
                            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **env})

    out, result = run("a")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [out.read_bytes()]
    out, killed = run("b", FIRST_KD_CRASH_AT="generate:after-unit-write:0")
    assert killed.returncode == -9 and not out.exists(), killed.stderr[-3000:]
    out, resumed = run("b")
    assert resumed.returncode == 0 and "1 of 2 unit(s) already written" in resumed.stdout, resumed.stderr[-3000:]
    runs.append(out.read_bytes())
    assert runs[0] == runs[1]  # seeded per unit, stage and request: a resumed run writes the same bytes
    spec = yaml.safe_load((REPO / "configs" / "programs" / "bsm.yaml").read_text())
    records = [json.loads(line) for line in runs[0].splitlines()]
    assert len(records) == 2 * 3
    for rec in records:
        want = expected_prompts(spec, pairs[int(rec["id"][1:])], rec)
        assert rec["stage_prompts"] == want["stages"] and rec["prompt"] == want["prompt"]
    assert json.loads((tmp_path / "gen-a.meta.json").read_text())["settings"]["engine"]["name"] == "vllm"
