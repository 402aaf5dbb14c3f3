"""`first-kd generate` on tiny Llama teachers: record fields and counts, greedy decoding against an
independent argmax loop, sampling against the temperature / top-p distribution computed by hand,
seeded reproducibility, resume after a kill (SIGKILL in a subprocess, and interruptions at every crash
point in-process) equal to an uninterrupted run, and the refusals."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from first_kd import decoding
from first_kd.commands import generate as G
from first_kd.cli import main
from first_kd.config import build
from first_kd.errors import FirstKDError
from first_kd.data.rationale import RationaleConfig, load_questions
from helpers import (LETTERS, build_letter_sure_model, build_peaked_model, mcqa_records, pr_records, read_jsonl, run_cli,
                     write_jsonl)

LETTER = r"\b(?P<answer>[A-E])\b"  # the letter-sure teacher writes bare option letters


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    from transformers import GenerationConfig

    from first_kd.tiny import build_llama

    root = tmp_path_factory.mktemp("generate")
    # Peaked (lm_head x 40) so greedy argmax is not decided by float noise between padded and unpadded runs.
    peaked = build_peaked_model(root / "peaked", tiny_tokenizer, hidden_size=64, num_layers=2)
    flat = build_llama(root / "flat", tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    vendor = GenerationConfig.from_pretrained(flat)
    vendor.do_sample, vendor.top_k = True, 5  # what a hub teacher may ship; generate's options replace it
    vendor.save_pretrained(flat)
    return {"root": root, "peaked": str(peaked), "flat": str(flat),
            "sure": str(build_letter_sure_model(root / "sure", tiny_tokenizer))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen-data")
    qa = [{"id": f"qa-{i}", "question": f"How many legs do {i} cats have?", "answer": f"#### {4 * i}"}
          for i in range(3)]
    return {"mcqa": write_jsonl(d / "mc.jsonl", mcqa_records(7, seed=3)),
            "pr": write_jsonl(d / "pr.jsonl", pr_records(4)), "qa": write_jsonl(d / "qa.jsonl", qa)}


def generate(teacher, data, out, *extra):
    return main(["generate", "--teacher", teacher, "--data", str(data), "--out", str(out), *extra])


def listing(folder):
    """The files of `folder` but the writers' lock files (outputs.exclusive_lock leaves an empty one)."""
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.endswith(".lock"))


# ----------------------------------------------------------------------------------------------
# pure helpers


def test_shuffle_and_unshuffle_round_trip():
    rng = random.Random(0)
    for n in range(1, 7):
        for _ in range(20):
            order = G.shuffle_options(["x"] * n, rng)
            assert sorted(order) == list(range(n))
            for shown, original in enumerate(order):
                # the letter displayed at position `shown` names option `original`
                assert G.unshuffle_letter("ABCDEF"[shown], order) == "ABCDEF"[original]
                assert G.unshuffle_letter("abcdef"[shown], order) == "ABCDEF"[original]
    order = [2, 0, 1]
    for bad in (None, "D", "Z", "7", "AB", ""):  # no answer, or no option shown under that letter
        assert G.unshuffle_letter(bad, order) is None
    # the same question and sample always get the same order, whatever the run or data order
    assert G._perturb_rng(0, "q1", 3).random() == G._perturb_rng(0, "q1", 3).random()
    assert G._perturb_rng(0, "q1", 3).random() != G._perturb_rng(0, "q2", 3).random()


def test_decode_generated_cuts_at_the_first_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    word = tok.encode(" tree house", add_special_tokens=False)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert decoding.decode_generated(word + [eos, pad, pad], {eos}, tok) == (" tree house", len(word) + 1, True)
    assert decoding.decode_generated(word, {eos}, tok) == (" tree house", len(word), False)
    other = tok.encode(" river", add_special_tokens=False)[0]  # a second stop id (a chat model's end of turn)
    assert decoding.decode_generated(word + [other] + word, {eos, other}, tok) == (" tree house", len(word) + 1, True)
    spaces = tok.encode("   ", add_special_tokens=False)
    assert decoding.decode_generated(word + spaces, {eos}, tok)[0] == " tree house"  # trailing whitespace goes
    assert G.unit_seed(0, 1) != G.unit_seed(0, 2) != G.unit_seed(1, 1)


@pytest.mark.parametrize("options, message", [
    ({"samples": 4}, "--temperature"),
    ({"temperature": -1}, "--temperature"),
    ({"temperature": 0.7, "top_p": 0}, "--top-p"),
    ({"top_p": 0.9}, "--top-p.*--temperature"),
    ({"perturb_samples": 3}, "--perturb"),
    ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"out": "gen.txt"}, ".jsonl"),
    ({"teacher": None}, "--teacher"),
    # non-finite and degenerate floats (issue 10: --temperature nan ran greedy and wrote NaN into meta.json)
    ({"temperature": float("nan")}, "--temperature must be a finite number"),
    ({"temperature": float("inf")}, "--temperature must be a finite number"),
    ({"temperature": float("-inf")}, "--temperature must be a finite number"),
    ({"temperature": 1e-30}, "too small to sample with"),
    ({"temperature": 0.7, "top_p": float("nan")}, r"--top-p must be a number in \(0, 1\]"),
    ({"temperature": 0.7, "top_p": float("inf")}, r"--top-p must be a number in \(0, 1\]"),
])
def test_bad_options_are_one_line_errors(options, message):
    values = {"teacher": "t", "data": "d.jsonl", "out": "gen.jsonl", **options}
    with pytest.raises(FirstKDError, match=message) as info:
        build(G.GenerateConfig, values)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# end to end


def test_records_fields_counts_and_perturbed_answers(tmp_path, models, data, capsys):
    out = tmp_path / "gen.jsonl"
    assert generate(models["sure"], data["mcqa"], out, "--samples", "3", "--temperature", "0.8",
                    "--perturb", "shuffle-options", "--perturb-samples", "2", "--batch-size", "3",
                    "--max-new-tokens", "6", "--extractor", LETTER) == 0
    raw = read_jsonl(data["mcqa"])
    recs = read_jsonl(out)
    assert [(r["id"], r["sample"]) for r in recs] == [(q["id"], s) for q in raw for s in range(5)]
    cfg = build(RationaleConfig, {"data": str(data["mcqa"])})
    questions = load_questions(datasets.Dataset.from_list(raw), cfg)
    for rec in recs:
        q_raw, q = raw[int(rec["id"].split("-")[1])], questions[int(rec["id"].split("-")[1])]
        assert set(rec) >= {"id", "sample", "prompt", "rationale", "answer", "gold", "perturbed", "n_tokens",
                            "finished"}
        assert rec["gold"] == q_raw["answerKey"]
        assert 1 <= rec["n_tokens"] <= 6 and (rec["finished"] or rec["n_tokens"] == 6)
        assert rec["rationale"] == rec["rationale"].rstrip()
        assert rec["perturbed"] == (rec["sample"] >= 3) == ("option_order" in rec)
        if not rec["perturbed"]:
            assert rec["prompt"] == q.prompt
            assert rec["answer"] == G.extract_answer(rec["rationale"], LETTER)
            continue
        order = rec["option_order"]
        texts = q_raw["choices"]["text"]
        assert sorted(order) == list(range(5))
        # The prompt shows the options in `order`, written out here independently of the code under test.
        shown = "\n".join(f"{LETTERS[j]}. {texts[i]}" for j, i in enumerate(order))
        assert rec["prompt"] == f"Question: {q_raw['question']}\n{shown}\nAnswer: Let's think step by step."
        letter = G.extract_answer(rec["rationale"], LETTER)
        if letter is None:
            assert rec["answer"] is None
        else:
            # the mapped-back answer names the option whose text was displayed beside the letter the teacher wrote
            displayed = dict(line.split(". ", 1) for line in shown.splitlines())[letter]
            assert texts[LETTERS.index(rec["answer"])] == displayed
    perturbed = [r for r in recs if r["perturbed"]]
    assert sum(r["answer"] is not None for r in perturbed) >= len(perturbed) // 2  # the mapping was exercised
    assert len({tuple(r["option_order"]) for r in perturbed}) > 1

    # summary line and meta file agree with counts taken from the records
    n_answered = sum(r["answer"] is not None for r in recs)
    correct = sum(r["answer"] == r["gold"] for r in recs)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"7 questions, 35 samples (14 perturbed), answers extracted {n_answered}" in summary
    assert f"accuracy vs gold {correct}/35" in summary
    meta = json.loads((tmp_path / "gen.meta.json").read_text())
    assert meta["counts"]["samples"] == 35 and meta["counts"]["correct"] == correct
    assert meta["settings"]["samples"] == 3 and meta["settings"]["perturb"] == "shuffle-options"
    assert listing(tmp_path) == ["gen.jsonl", "gen.meta.json"]


def _greedy_oracle(model, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Argmax decoding of one unpadded prompt, full forward each step (no cache, no generate())."""
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token in eos_ids:
                break
    return new


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_equals_independent_argmax_loop(tmp_path, models, data, tiny_tokenizer, chat):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(models["peaked"], teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    if chat:
        tok.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}[assistant]{% endif %}")
        tok.save_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    cfg = build(RationaleConfig, {"data": str(data["pr"]), "chat_template": chat})
    questions = load_questions(datasets.Dataset.from_list(read_jsonl(data["pr"])), cfg)
    texts = [tok.apply_chat_template([{"role": "user", "content": q.prompt}], add_generation_prompt=True,
                                     tokenize=False) if chat else q.prompt for q in questions]
    prompt_ids = [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    assert len({len(p) for p in prompt_ids}) > 1  # one batch of different lengths: left padding is exercised

    # A second stop id, as chat models have, taken from the middle of one continuation so that some rows
    # end early and others run to --max-new-tokens.
    free = _greedy_oracle(model, prompt_ids[0], 10, set())
    stop = next((t for j, t in enumerate(free) if j >= 2 and t not in free[:j]), free[-1])
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    model.generation_config.repetition_penalty = 1000.0  # a vendor default the command must not apply
    model.save_pretrained(teacher)

    out = tmp_path / "gen.jsonl"
    extra = ["--chat-template"] if chat else []
    assert generate(str(teacher), data["pr"], out, "--max-new-tokens", "10", "--batch-size", "4", *extra) == 0
    recs = read_jsonl(out)
    assert [r["prompt"] for r in recs] == [q.prompt for q in questions]  # the plain prompt, never templated
    for rec, ids in zip(recs, prompt_ids):
        new = _greedy_oracle(model, ids, 10, {tok.eos_token_id, stop})
        finished = new[-1] in (tok.eos_token_id, stop)
        text = tok.decode(new[:-1] if finished else new, skip_special_tokens=True).rstrip()
        assert (rec["rationale"], rec["n_tokens"], rec["finished"]) == (text, len(new), finished)
    assert any(r["finished"] for r in recs)


def test_sampling_follows_temperature_and_top_p(tmp_path, models, data, tiny_tokenizer):
    """First sampled tokens against the distribution computed by hand: top-p keeps them in the nucleus of
    softmax(logits / T), and without top-p no hidden top-k (transformers' default 50) narrows them."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer
    model = AutoModelForCausalLM.from_pretrained(models["flat"]).eval()
    cfg = build(RationaleConfig, {"data": str(data["qa"]), "limit": 1})
    (question,) = load_questions(datasets.Dataset.from_list(read_jsonl(data["qa"])[:1]), cfg)
    with torch.no_grad():
        logits = model(torch.tensor([tok(question.prompt)["input_ids"]])).logits[0, -1]

    def text_of(token):
        return tok.decode([token], skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip()

    def first_tokens(*extra):
        out = tmp_path / "gen.jsonl"
        assert generate(models["flat"], data["qa"], out, "--limit", "1", "--samples", "300", "--max-new-tokens",
                        "1", "--overwrite", *extra) == 0
        return [r["rationale"] for r in read_jsonl(out)]

    free = first_tokens("--temperature", "2.0")
    assert len(set(free)) > 60  # the teacher's own generation_config asks for top_k 5: not applied

    temperature, top_p = 0.7, 0.3
    probs = torch.softmax(logits / temperature, -1)
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
    nucleus = {text_of(int(t)) for t in order[before < top_p + 1e-4]}
    outside = {text_of(int(t)) for t in order[before >= top_p + 1e-4]} - nucleus
    sampled = first_tokens("--temperature", str(temperature), "--top-p", str(top_p))
    assert set(sampled) <= nucleus
    assert len(set(sampled)) > 1 and outside  # the check could have failed


def test_sampling_reproducible_for_a_seed_and_different_across_seeds(tmp_path, models, data):
    args = ["--samples", "2", "--temperature", "1.0", "--max-new-tokens", "5", "--batch-size", "2"]
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert generate(models["peaked"], data["pr"], a, *args, "--seed", "3") == 0
    assert generate(models["peaked"], data["pr"], b, *args, "--seed", "3") == 0
    assert generate(models["peaked"], data["pr"], c, *args, "--seed", "4") == 0
    assert a.read_bytes() == b.read_bytes()
    assert [r["rationale"] for r in read_jsonl(a)] != [r["rationale"] for r in read_jsonl(c)]
    # the two samples of one question are drawn independently
    recs = read_jsonl(a)
    assert any(recs[i]["rationale"] != recs[i + 1]["rationale"] for i in range(0, len(recs), 2))


# ----------------------------------------------------------------------------------------------
# resume


RESUME_ARGS = ["--samples", "2", "--temperature", "0.9", "--perturb", "shuffle-options", "--batch-size", "2",
               "--max-new-tokens", "6", "--extractor", LETTER]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models, data):
    out = tmp_path_factory.mktemp("gen-ref") / "ref.jsonl"
    assert generate(models["sure"], data["mcqa"], out, *RESUME_ARGS) == 0
    return out


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, models, data, reference, capsys):
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--teacher", models["sure"], "--data", str(data["mcqa"]), "--out", str(out), *RESUME_ARGS]
    killed = run_cli(args, env={"FIRST_KD_CRASH_AT": "generate:after-unit-write:1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()  # a killed run never leaves something that looks finished
    assert len(read_jsonl(tmp_path / "gen.jsonl.partial")) == 2 * 2 * 3  # units 0 and 1: 2 questions x 3 samples
    capsys.readouterr()
    assert main(args) == 0
    assert f"resuming {out}: 2 of 4 unit(s) already written" in capsys.readouterr().out
    assert out.read_bytes() == reference.read_bytes()
    assert listing(tmp_path) == ["gen.jsonl", "gen.meta.json"]


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", ["generate:planned", "generate:after-unit-write:0",
                                      "generate:torn-unit-write:2", "generate:before-rename"])
def test_interrupted_at_any_point_resumes_to_the_same_file(tmp_path, models, data, reference, monkeypatch, crash_at):
    out = tmp_path / "gen.jsonl"

    def crash(name):
        if name == crash_at:
            raise _Crash(name)

    with monkeypatch.context() as m:
        m.setattr(G, "crash_point", crash)
        m.setenv("FIRST_KD_CRASH_AT", crash_at)  # the torn write reads it directly
        with pytest.raises(_Crash):
            generate(models["sure"], data["mcqa"], out, *RESUME_ARGS)
    partial = tmp_path / "gen.jsonl.partial"
    if "torn" in crash_at:
        assert not partial.read_bytes().endswith(b"\n")  # half a unit, the last line cut
    assert not out.exists()
    assert generate(models["sure"], data["mcqa"], out, *RESUME_ARGS) == 0
    assert out.read_bytes() == reference.read_bytes()


def test_resume_with_other_settings_is_refused(tmp_path, models, data, reference, monkeypatch, capsys):
    out = tmp_path / "gen.jsonl"

    def crash(name):
        if name == "generate:after-unit-write:0":
            raise _Crash(name)

    with monkeypatch.context() as m:
        m.setattr(G, "crash_point", crash)
        with pytest.raises(_Crash):
            generate(models["sure"], data["mcqa"], out, *RESUME_ARGS)
    partial = (tmp_path / "gen.jsonl.partial").read_bytes()
    capsys.readouterr()
    assert generate(models["sure"], data["mcqa"], out, *RESUME_ARGS, "--seed", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "seed: 0 -> 1" in err and "--overwrite" in err and "\n" not in err
    assert (tmp_path / "gen.jsonl.partial").read_bytes() == partial  # the earlier work is left alone
    # --overwrite starts over with the new settings
    assert generate(models["sure"], data["mcqa"], out, *RESUME_ARGS, "--seed", "1", "--overwrite") == 0
    assert json.loads((tmp_path / "gen.meta.json").read_text())["settings"]["seed"] == 1
    assert out.read_bytes() != reference.read_bytes()


def test_same_command_twice_is_a_no_op_and_other_settings_are_refused(tmp_path, models, data, capsys):
    out, meta = tmp_path / "gen.jsonl", tmp_path / "gen.meta.json"
    args = ("--max-new-tokens", "3")
    assert generate(models["peaked"], data["pr"], out, *args) == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out, meta)}
    capsys.readouterr()
    # A scheduler re-running the finished job: exit 0, one line saying so, nothing rewritten.
    assert generate(models["peaked"], data["pr"], out, *args) == 0
    err = capsys.readouterr().err.strip()
    assert "nothing to do" in err and str(out) in err and "\n" not in err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out, meta)} == before
    # Other settings on the same output: refused, naming the difference and the fix.
    assert generate(models["peaked"], data["pr"], out, "--max-new-tokens", "4") == 2
    err = capsys.readouterr().err.strip()
    assert "max_new_tokens: 3 -> 4" in err and "--overwrite" in err and "\n" not in err
    assert out.read_bytes() == before[out][0]
    # An output edited after generate wrote it is not mistaken for a finished one.
    out.write_bytes(before[out][0].replace(b'"sample": 0', b'"sample": 7', 1))
    assert generate(models["peaked"], data["pr"], out, *args) == 2
    assert "changed after generate wrote it" in capsys.readouterr().err
    assert generate(models["peaked"], data["pr"], out, "--max-new-tokens", "4", "--overwrite") == 0
    assert max(r["n_tokens"] for r in read_jsonl(out)) == 4
    # strict JSON: no NaN/Infinity tokens anywhere in what generate writes
    json.loads(meta.read_text(), parse_constant=lambda token: pytest.fail(f"meta.json holds {token}"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_generate_did_not_write_is_never_replaced(tmp_path, models, data, capsys, overwrite):
    extra = ["--overwrite"] if overwrite else []
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"mine": 1}\n')
    assert generate(models["peaked"], data["pr"], foreign, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a `first-kd generate` output" in err and "choose another --out" in err and "\n" not in err
    assert foreign.read_text() == '{"mine": 1}\n' and listing(tmp_path) == ["notes.jsonl"]
    # ... nor a file at the meta's place, nor a directory given as --out
    (tmp_path / "gen.meta.json").write_text("my own notes\n")
    assert generate(models["peaked"], data["pr"], tmp_path / "gen.jsonl", *extra) == 2
    assert "gen.meta.json exists but is not a `first-kd generate` output" in capsys.readouterr().err
    assert (tmp_path / "gen.meta.json").read_text() == "my own notes\n"
    (tmp_path / "dir.jsonl").mkdir()
    assert generate(models["peaked"], data["pr"], tmp_path / "dir.jsonl", *extra) == 2
    assert "is a directory" in capsys.readouterr().err


def test_temperature_nan_on_the_command_line_writes_nothing(tmp_path, models, data, capsys):
    out = tmp_path / "gen.jsonl"
    assert generate(models["peaked"], data["pr"], out, "--temperature", "nan") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("first-kd generate: error: --temperature") and "\n" not in err
    assert listing(tmp_path) == []


def _long_prompt_data(folder, tiny_tokenizer, n_long_words):
    records = pr_records(4, seed=5)
    records[2]["prompt"] = " ".join(["tree house river"] * n_long_words)
    path = write_jsonl(folder / "long.jsonl", records)
    lengths = [len(tiny_tokenizer(r["prompt"] + " Let's think step by step.")["input_ids"]) for r in records]
    return path, lengths


def test_a_prompt_beyond_max_length_or_the_teachers_positions_is_refused_naming_the_record(
        tmp_path, models, data, tiny_tokenizer, capsys):
    path, lengths = _long_prompt_data(tmp_path, tiny_tokenizer, 200)  # the teachers have 512 positions
    assert lengths[2] > 512 > max(lengths[:2] + lengths[3:])
    out = tmp_path / "gen.jsonl"
    assert generate(models["peaked"], path, out, "--max-new-tokens", "4") == 2
    err = capsys.readouterr().err.strip()
    assert f"record 2 (id pr-2): prompt is {lengths[2]} tokens, leaving nothing of --max-length 512" in err
    assert "raise --max-length or shorten the prompt" in err and "\n" not in err
    # --max-length above the teacher's positions does not lift the teacher's limit
    assert generate(models["peaked"], path, out, "--max-new-tokens", "4", "--max-length", "100000") == 2
    err = capsys.readouterr().err.strip()
    assert "record 2 (id pr-2)" in err and "the teacher's 512 positions" in err and "\n" not in err
    assert listing(tmp_path) == ["long.jsonl"]


def test_rationales_stop_where_max_length_is_reached(tmp_path, models, tiny_tokenizer, monkeypatch, capsys):
    path, lengths = _long_prompt_data(tmp_path, tiny_tokenizer, 10)
    max_length, max_new = lengths[2] + 3, 8  # the long prompt has room for 3 tokens, the others for 8
    assert max(lengths[:2] + lengths[3:]) + max_new <= max_length
    calls = []
    real_call = decoding.generate_ids  # the one generate call

    def spy(model, inputs, pad_id, stop_ids, max_new_tokens, *args, **kwargs):
        width = max(len(ids) for ids in inputs)
        calls.append((width, max_new_tokens))
        return real_call(model, inputs, pad_id, stop_ids, max_new_tokens, *args, **kwargs)

    monkeypatch.setattr(decoding, "generate_ids", spy)
    out = tmp_path / "gen.jsonl"
    assert generate(models["peaked"], path, out, "--max-new-tokens", str(max_new), "--max-length",
                    str(max_length), "--batch-size", "4") == 0
    # no generate call ever runs a (left-padded) row past --max-length
    assert calls and all(width + new <= max_length for width, new in calls)
    assert sorted(new for _, new in calls) == [3, max_new]  # only the long prompt's row got less room
    for rec, n in zip(read_jsonl(out), lengths):
        assert n + rec["n_tokens"] <= max_length
        assert rec["finished"] or rec["n_tokens"] == min(max_new, max_length - n)
    assert "1 sample(s) have less room than --max-new-tokens 8 within --max-length" in capsys.readouterr().err
    meta = json.loads((tmp_path / "gen.meta.json").read_text())
    assert meta["settings"]["max_length"] == max_length and meta["samples_with_less_room"] == 1


def test_output_folder_that_cannot_exist_is_one_line(tmp_path, models, data, capsys):
    """Read-only output, simulated without chmod (tests run as root, which ignores permissions): --out under
    a path whose parent is a regular file, so no folder can be created there."""
    blocker = tmp_path / "file"
    blocker.write_text("x\n")
    assert generate(models["peaked"], data["pr"], blocker / "sub" / "gen.jsonl") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("first-kd generate: error: --out") and "is a file, not a folder" in err
    assert "\n" not in err and "Traceback" not in err and blocker.read_text() == "x\n"


def test_full_disk_is_one_line_and_a_rerun_resumes_to_the_same_file(tmp_path, models, data, reference):
    out = tmp_path / "gen.jsonl"
    args = ["generate", "--teacher", models["sure"], "--data", str(data["mcqa"]), "--out", str(out), *RESUME_ARGS]
    limit = len(reference.read_bytes()) // 2  # room for about half the lines
    full = run_cli(args, limit_bytes=limit)
    assert full.returncode == 2, full.stderr[-2000:]
    err = [line for line in re.split(r"[\r\n]+", full.stderr) if line.strip() and "generating" not in line]
    assert len(err) == 1 and err[0].startswith("first-kd generate: error:"), full.stderr[-2000:]
    assert "EFBIG" in err[0] and "gen.jsonl.partial" in err[0] and "re-run the same command" in err[0]
    assert not out.exists() and 0 < (tmp_path / "gen.jsonl.partial").stat().st_size <= limit
    assert generate(models["sure"], data["mcqa"], out, *RESUME_ARGS) == 0  # space freed: it resumes
    assert out.read_bytes() == reference.read_bytes()
    # Replacing a finished output on a full disk loses nothing: the old output and its meta stay whole.
    before = {p.name: p.read_bytes() for p in (out, tmp_path / "gen.meta.json")}
    again = run_cli([*args, "--seed", "5", "--overwrite"], limit_bytes=limit)
    assert again.returncode == 2 and "EFBIG" in again.stderr and "Traceback" not in again.stderr
    assert {p.name: p.read_bytes() for p in (out, tmp_path / "gen.meta.json")} == before


@pytest.mark.parametrize("name, text, where", [
    ("mid.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c", "resp\n{"prompt": "d", "response": "e"}\n',
     "line 2 is not valid JSON"),
    ("list.jsonl", '{"prompt": "a", "response": "b"}\n\n["c", "d"]\n', "line 3 is a JSON list, not an object"),
    ("doc.json", '[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c" "response": "d"}\n]\n',
     "line 3 is not valid JSON (Expecting ',' delimiter"),
])
def test_an_invalid_json_line_is_one_line_naming_file_and_line(tmp_path, capfd, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    # generate reads --data through data.load_records before it loads any teacher
    assert generate("no-such-teacher", path, tmp_path / "gen.jsonl") == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err  # datasets' own log line is not printed beside ours
    assert err[0].startswith(f"first-kd generate: error: --data {path}: could not read it as json: {where}")
    assert err[0].endswith("; fix or remove that line")


def test_perturb_needs_multiple_choice_data(tmp_path, models, data, capsys):
    assert generate(models["peaked"], data["qa"], tmp_path / "g.jsonl", "--perturb", "shuffle-options") == 2
    assert "multiple-choice" in capsys.readouterr().err
    assert listing(tmp_path) == []
