"""`first-kd evaluate --modes`: the scoring helpers by hand, and a tiny Llama trained here on [slow] / [fast]
variants, evaluated end to end with its confidences recomputed by a plain forward pass; then `first-kd report`
on the result. (The answer-span helpers against the tokenizer's own offsets: test_decoding.py.)"""

from __future__ import annotations

import json
import random

import datasets
import numpy as np
import pytest
import torch

from first_kd import decoding, scoring
from first_kd.cli import main
from first_kd.data import DataConfig, encode_prompts, tokenize_records
from first_kd.data.rationale import find_answer
from first_kd.data.traces import marker_prefix_ids
from helpers import PNG_MAGIC, file_bytes

NAMES = "one two three four five".split()
CUE = "Let's think step by step."


# ----------------------------------------------------------------------------------------------
# pure helpers


def test_completion_mode():
    assert scoring.completion_mode("[slow]\nstep\nThe answer is 3.", "[slow]", "[fast]") == "slow"
    assert scoring.completion_mode("  [fast]\nThe answer is 3.", "[slow]", "[fast]") == "fast"
    assert scoring.completion_mode("The answer is 3. [fast]", "[slow]", "[fast]") == "none"
    assert scoring.completion_mode("", "[slow]", "[fast]") == "none"


def test_summarize():
    lines = [
        {"correct": True, "confidence": 0.9, "answer": "3", "n_generated_tokens": 10, "finished": True,
         "chosen_mode": "slow"},
        {"correct": False, "confidence": 0.6, "answer": "4", "n_generated_tokens": 4, "finished": True,
         "chosen_mode": "fast"},
        {"correct": False, "confidence": 0.0, "answer": None, "n_generated_tokens": 30, "finished": False,
         "chosen_mode": "fast"},
        {"correct": True, "confidence": 0.7, "answer": "5", "n_generated_tokens": 8, "finished": True,
         "chosen_mode": "none"},
    ]
    s = scoring.summarize_generation(lines, n_bins=10)
    assert s["n"] == 4 and s["accuracy"] == 0.5 and s["mean_confidence"] == pytest.approx(0.55)
    assert s["brier"] == pytest.approx(np.mean([0.01, 0.36, 0.0, 0.09]))
    # every example in its own bin: ECE = mean |correct - confidence|
    assert s["ece"] == pytest.approx(np.mean([0.1, 0.6, 0.0, 0.3])) and s["mce"] == pytest.approx(0.6)
    assert s["mean_generated_tokens"] == 13.0 and s["no_answer_rate"] == 0.25 and s["finished_rate"] == 0.75
    assert s["chosen_modes"] == {"slow": 0.25, "fast": 0.5, "none": 0.25}
    assert s["nll"] is None and s["level"] == "generation" and sum(s["bins"]["count"]) == 4
    assert "chosen_modes" not in scoring.summarize_generation([{**x, "chosen_mode": None} for x in lines])


# ----------------------------------------------------------------------------------------------
# end to end on a tiny Llama taught to answer slow or fast


def make_questions(n=8, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        out.append({"id": f"q{i}", "question": f"what is {NAMES[a - 1]} plus {NAMES[b - 1]}?", "answer": str(a + b),
                    "steps": [f"take {NAMES[a - 1]}", f"add {NAMES[b - 1]}", f"count to {a + b}"]})
    return out


def train_until_memorised(model, rows, steps=400, lr=5e-3, margin=2.0):
    """Full-batch CE on the target tokens of `rows` (tokenize_records output) until, for every target the
    data determines, the model's top logit is that target's by `margin`; returns that smallest margin.

    A target is determined when every row with the same tokens before it continues with it: the [slow] and
    [fast] variants share their prompt, so the first token where the markers differ is not. A margin far
    above float noise makes greedy decoding reproduce the training sequences on any machine; a loss
    threshold did not (at loss 0.05 some targets were still out-scored by up to a logit, so what the model
    wrote depended on the run). Measured: 90-130 steps over 16 initialisations at this lr."""
    width = max(len(x) for x in rows["input_ids"])
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    following: dict[tuple, set] = {}
    for r, (x, start) in enumerate(zip(rows["input_ids"], rows["target_start"])):
        ids[r, : len(x)] = torch.tensor(x)
        labels[r, start: len(x)] = torch.tensor(x[start:])
        mask[r, : len(x)] = 1
        for j in range(1, len(x)):
            following.setdefault(tuple(x[:j]), set()).add(x[j])
    determined = labels.clone()
    for r, (x, start) in enumerate(zip(rows["input_ids"], rows["target_start"])):
        for j in range(start, len(x)):
            if len(following[tuple(x[:j])]) > 1:
                determined[r, j] = -100
    target = determined[:, 1:]
    scored = target != -100
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    smallest = float("-inf")
    for step in range(1, steps + 1):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            model.eval()
            with torch.no_grad():
                z = model(input_ids=ids, attention_mask=mask).logits[:, :-1][scored]
            t = target[scored][:, None]
            others = z.scatter(1, t, float("-inf")).max(1).values
            smallest = float((z.gather(1, t)[:, 0] - others).min())
            if smallest >= margin:
                break
    model.eval()
    return smallest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from first_kd.tiny import build_llama, train_tokenizer

    root = tmp_path_factory.mktemp("evaluate_modes")
    questions = make_questions()
    train = [{"id": q["id"], "prompt": f"Question: {q['question']}\nAnswer: {CUE}",
              "response": "\n".join(q["steps"] + [f"The answer is {q['answer']}."])} for q in questions]
    tok = train_tokenizer([r["prompt"] + "\n" + r["response"] for r in train] * 4 + ["[slow]\n[fast]\n"] * 4, 300)
    model_dir = build_llama(root / "model", tok, hidden_size=32, num_layers=1, num_heads=2)
    rows, _ = tokenize_records(datasets.Dataset.from_list(train), tok, DataConfig(trace_levels="0,1"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    margin = train_until_memorised(model, rows)
    assert margin >= 2.0, f"the tiny model did not learn its 16 sequences (smallest logit margin {margin:.2f})"
    model.save_pretrained(str(model_dir))
    test = root / "test.jsonl"
    test.write_text("".join(json.dumps({"id": q["id"], "question": q["question"], "answer": q["answer"]}) + "\n"
                            for q in questions))
    out = root / "eval"
    args = ["evaluate", "--model", str(model_dir), "--data", str(test), "--modes", "slow,fast,auto",
            "--max-new-tokens", "40", "--batch-size", "3", "--label", "tiny"]
    assert main(args + ["--out", str(out)]) == 0
    return {"root": root, "model": model, "tok": tok, "questions": questions, "rows": rows, "out": out, "args": args,
            "metrics": json.loads((out / "metrics.json").read_text()),
            "lines": [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]}


def test_metrics_schema_and_per_mode_counts(trained):
    metrics, lines, n = trained["metrics"], trained["lines"], len(trained["questions"])
    assert list(metrics["modes"]) == ["slow", "fast", "auto"]
    for key in ("accuracy", "ece", "mce", "brier", "mean_confidence", "n", "n_bins", "bins", "label", "source"):
        assert key in metrics, key
    top = {k: v for k, v in metrics.items() if k in metrics["modes"]["slow"]}
    assert top == metrics["modes"]["slow"]  # the first mode is the top level
    for mode, s in metrics["modes"].items():
        mine = [x for x in lines if x["mode"] == mode]
        assert [x["id"] for x in mine] == [q["id"] for q in trained["questions"]]  # data order
        assert s["n"] == n and sum(s["bins"]["count"]) == n
        assert s["accuracy"] == pytest.approx(np.mean([x["correct"] for x in mine]))
        assert s["mean_confidence"] == pytest.approx(np.mean([x["confidence"] for x in mine]))
        assert s["mean_generated_tokens"] == pytest.approx(np.mean([len(x["completion_ids"]) for x in mine]))
        assert (trained["out"] / f"reliability-{mode}.png").read_bytes()[:8] == PNG_MAGIC
    assert (trained["out"] / "reliability.png").read_bytes()[:8] == PNG_MAGIC
    assert len(lines) == 3 * n
    chosen = metrics["modes"]["auto"]["chosen_modes"]
    assert sum(chosen.values()) == pytest.approx(1.0) and "chosen_modes" not in metrics["modes"]["slow"]


def test_forced_modes_start_with_the_training_marker_ids(trained):
    tok, rows = trained["tok"], trained["rows"]
    prompts = encode_prompts(tok, [f"Question: {q['question']}\nAnswer: {CUE}" for q in trained["questions"]])
    for mode, variant in (("slow", "#full"), ("fast", "#fast")):
        inputs, forced = decoding.mode_inputs(prompts, mode, tok, "[slow]", "[fast]", "\n")
        assert forced == marker_prefix_ids(tok, f"[{mode}]", "\n") and len(forced) > 0
        assert all(x[-len(forced):] == forced and x[: -len(forced)] == p for x, p in zip(inputs, prompts))
        # token for token what the model was trained on: prompt, then the marker prefix of the variant
        row = rows[rows["id"].index(trained["questions"][0]["id"] + variant)]
        assert row["input_ids"][: len(inputs[0])] == inputs[0]
        assert all(x["forced_ids"] == forced for x in trained["lines"] if x["mode"] == mode)
    assert decoding.mode_inputs(prompts, "auto", tok, "[slow]", "[fast]", "\n") == (prompts, [])


def test_the_trained_model_answers_slow_and_fast(trained):
    by_mode = {m: [x for x in trained["lines"] if x["mode"] == m] for m in ("slow", "fast", "auto")}
    assert all(x["finished"] and x["answer"] is not None for x in trained["lines"])
    for mode, lines in by_mode.items():  # memorised by a margin (see the fixture): all 8 right, in every mode
        assert trained["metrics"]["modes"][mode]["accuracy"] == 1.0
        assert all(x["correct"] == (x["answer"] == x["gold"]) for x in lines)
    questions = {q["id"]: q for q in trained["questions"]}
    for x in by_mode["fast"]:  # no steps: the answer line straight away, as trained
        assert x["completion"] == f"The answer is {questions[x['id']]['answer']}."
    for x in by_mode["slow"]:  # the steps it was trained on, then the answer line
        q = questions[x["id"]]
        assert x["completion"] == "\n".join(q["steps"] + [f"The answer is {q['answer']}."])
    for x in by_mode["auto"]:
        assert x["chosen_mode"] == scoring.completion_mode(x["completion"], "[slow]", "[fast]") != "none"
    slow, fast = (trained["metrics"]["modes"][m]["mean_generated_tokens"] for m in ("slow", "fast"))
    assert fast < slow
    # Having written a marker itself, the model goes on exactly as when that marker is forced.
    tok = trained["tok"]
    for x in by_mode["auto"]:
        forced = marker_prefix_ids(tok, f"[{x['chosen_mode']}]", "\n")
        twin = next(y for y in by_mode[x["chosen_mode"]] if y["id"] == x["id"])
        assert x["completion_ids"][: len(forced)] == forced
        assert x["completion_ids"][len(forced):] == twin["completion_ids"]
        assert x["confidence"] == pytest.approx(twin["confidence"], rel=1e-4)
        assert x["n_generated_tokens"] == twin["n_generated_tokens"] + len(forced)


def test_confidence_is_the_answer_probability_of_a_plain_forward_pass(trained):
    tok, model = trained["tok"], trained["model"]
    checked = 0
    for line in trained["lines"]:
        q = next(q for q in trained["questions"] if q["id"] == line["id"])
        prompt = tok(f"Question: {q['question']}\nAnswer: {CUE}")["input_ids"]
        seq = prompt + line["forced_ids"] + line["completion_ids"]
        gen_start = len(prompt) + len(line["forced_ids"])
        # which generated tokens spell the answer: the shortest decoded prefixes that reach its characters
        text_ids = line["completion_ids"][:-1] if line["finished"] else line["completion_ids"]
        assert tok.decode(text_ids, skip_special_tokens=True) == line["completion"]
        _, start, end = find_answer(line["completion"], "answer-is")
        first = next(j for j in range(len(text_ids)) if len(tok.decode(text_ids[: j + 1])) > start)
        last = next(j for j in range(len(text_ids)) if len(tok.decode(text_ids[: j + 1])) >= end) + 1
        assert line["answer_tokens"] == [first, last]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
        expected = float(sum(logp[gen_start + j - 1, seq[gen_start + j]] for j in range(first, last)).exp())
        assert line["confidence"] == pytest.approx(expected, rel=1e-4)
        checked += 1
    assert checked == len(trained["lines"])


def test_report_shows_one_row_per_mode(trained, tmp_path):
    assert main(["report", str(trained["out"]), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert "Mean tokens" in header
    # labels are Markdown-escaped in the table ("tiny \\[slow\\]" renders as "tiny [slow]")
    rows = {line.split("|")[1].strip().replace("\\", ""): [c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines()[4:] if line.startswith("| tiny")}
    assert list(rows) == ["tiny [slow]", "tiny [fast]", "tiny [auto]"]
    for mode, cells in zip(("slow", "fast", "auto"), rows.values()):
        s = trained["metrics"]["modes"][mode]
        cells = dict(zip(header, (c.replace("*", "") for c in cells)))
        assert cells["Mean tokens"] == f"{s['mean_generated_tokens']:.1f}" and cells["n"] == str(s["n"])
        assert cells["ECE"] == f"{s['ece']:.4f}"
        assert f"(../{trained['out'].name}/reliability-{mode}.png)" in md or f"reliability-{mode}.png)" in md
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(report["models"]) == ["tiny [slow]", "tiny [fast]", "tiny [auto]"]


@pytest.mark.parametrize("args, message", [
    (["--model", "m", "--data", "d.jsonl", "--modes", "slow,medium"], "unknown mode 'medium'"),
    (["--model", "m", "--data", "d.jsonl", "--modes", "fast,fast"], "names a mode twice"),
    (["--store", "s.zarr", "--modes", "auto"], "not --store"),
    (["--model", "m", "--modes", "auto"], "--data"),
    (["--model", "m", "--data", "d.jsonl", "--modes", "auto", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    assert main(["evaluate", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_questions_without_answers_are_an_error(trained, tmp_path, capsys):
    data = tmp_path / "noanswers.jsonl"
    data.write_text(json.dumps({"id": "x", "question": "what is one plus one?"}) + "\n")
    assert main(["evaluate", "--model", str(trained["root"] / "model"), "--data", str(data), "--modes", "auto",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no gold answer" in err and "--answer-field" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------
# the output directory: same command twice, other settings, a failed write


def test_same_modes_command_is_a_no_op_a_new_label_renames(trained, tmp_path, capsys, monkeypatch):
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(trained["out"], out)
    before = file_bytes(out)
    monkeypatch.setattr(scoring, "greedy_generate", lambda *a, **k: pytest.fail("generated again"))
    capsys.readouterr()
    assert main(trained["args"] + ["--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().err and file_bytes(out) == before

    assert main(trained["args"] + ["--out", str(out), "--max-new-tokens", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_new_tokens: 40 -> 30" in err and "--overwrite" in err, err
    assert file_bytes(out) == before

    assert main(trained["args"][:-1] + ["renamed", "--out", str(out)]) == 0
    after = file_bytes(out)
    metrics = json.loads(after["metrics.json"])
    assert metrics["label"] == "renamed" and {**metrics, "label": "tiny"} == json.loads(before["metrics.json"])
    assert after["predictions.jsonl"] == before["predictions.jsonl"] and after.keys() == before.keys()
    assert all(after[f] != before[f] for f in after if f.endswith(".png"))  # titles name the new label


def test_a_failed_write_keeps_the_finished_evaluation(trained, tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    from first_kd import plots

    out = tmp_path / "eval"
    shutil.copytree(trained["out"], out)
    before = file_bytes(out)

    def full_disk(panels, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(plots, "save_reliability_comparison", full_disk)
    capsys.readouterr()
    assert main(trained["args"] + ["--out", str(out), "--max-new-tokens", "30", "--overwrite"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "first-kd evaluate: error:" in line]  # after progress bars
    assert "Traceback" not in err and len(errors) == 1, err
    assert "No space left" in errors[0] and "reliability.png" in errors[0], err
    assert file_bytes(out) == before  # metrics, predictions and every figure of the finished evaluation
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging-")]


# ----------------------------------------------------------------------------------------------
# auto mode's decision: the model's own marker probabilities, drawn per question


def test_choose_modes_draws_each_marker_at_the_models_rate():
    keys = [f"q{i}" for i in range(4000)]
    probs = np.tile([[0.27, 0.63]], (len(keys), 1))  # P(slow) share 0.3
    drawn = decoding.choose_modes(probs, keys, seed=0)
    share = np.mean([c == "slow" for c in drawn])
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(keys))  # a binomial draw: 4 standard errors
    assert decoding.choose_modes(probs, keys, seed=0) == drawn  # reproducible
    assert decoding.choose_modes(probs, keys, seed=1) != drawn  # the seed matters
    # a question's draw depends on its id and the seed only, not on the other questions evaluated
    assert decoding.choose_modes(probs[::-1][:7], keys[::-1][:7], seed=0) == drawn[::-1][:7]
    assert decoding.choose_modes(probs[:3], keys[:3], seed=0, sample=False) == ["fast"] * 3  # the argmax
    assert decoding.choose_modes(np.array([[0.2, 0.25], [0.0, 1.0], [1.0, 0.0]]), ["a", "b", "c"], 0) == \
        [None, "fast", "slow"]  # under MARKER_MASS: no marker chosen; certain ones always drawn


def test_marker_probabilities_are_the_markers_chance_in_a_plain_forward(trained):
    tok, model = trained["tok"], trained["model"]
    prompts = encode_prompts(tok, [f"Question: {q['question']}\nAnswer: {CUE}" for q in trained["questions"]])
    slow, fast = (marker_prefix_ids(tok, m, "\n") for m in ("[slow]", "[fast]"))
    got = decoding.marker_probabilities(model, prompts, slow, fast, tok.pad_token_id, batch_size=3)
    for p, row in zip(prompts, got):
        for ids, value in zip((slow, fast), row):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([p + ids])).logits[0].double(), -1)
            oracle = float(np.exp(sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(ids))))
            assert value == pytest.approx(oracle, rel=1e-4, abs=1e-9)
    # trained on both variants of every question: nearly all its mass on the two markers
    assert np.all(got.sum(1) > decoding.MARKER_MASS)


def test_auto_lines_carry_the_models_share_of_slow(trained):
    auto = [x for x in trained["lines"] if x["mode"] == "auto"]
    assert all(0.0 <= x["p_slow"] <= 1.0 for x in auto)
    s = trained["metrics"]["modes"]["auto"]["p_slow"]
    assert s["n"] == len(auto) and s["mean"] == pytest.approx(np.mean([x["p_slow"] for x in auto]))
    assert s["min"] <= s["mean"] <= s["max"] and "p_slow" not in trained["metrics"]["modes"]["slow"]
