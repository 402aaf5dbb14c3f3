"""`first-kd evaluate` on tiny models and stores, checked against independent computations: a plain
unpadded full forward for models, the cached top-k by hand for stores, and model == store when the
store keeps the whole vocabulary."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from first_kd import scoring as S
from first_kd.commands import evaluate as E
from first_kd import metrics as M
from first_kd.cli import main
from first_kd.data import DataConfig, prepare_dataset
from first_kd.store import open_store, set_temperature
from helpers import PNG_MAGIC, WORDS, build_letter_sure_model, file_bytes, leftovers, run_cli, unwritable, write_mcqa


def write_alpaca(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "instruction": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))),
                                "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 7))) + "."}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("evaluate")
    # Opinionated about the option letters, so some letters are in its top-5 and some are not.
    model_dir = build_letter_sure_model(root / "model", tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return {"root": root, "model_dir": model_dir, "tokenizer": tiny_tokenizer, "model": model.eval(),
            "mcqa": write_mcqa(root / "mcqa.jsonl", 11), "alpaca": write_alpaca(root / "alpaca.jsonl", 7)}


def read_outputs(out):
    metrics = json.loads((out / "metrics.json").read_text())
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert (out / "reliability.png").read_bytes()[:8] == PNG_MAGIC
    return metrics, lines


def oracle_logits(model, input_ids):
    """Logits [L, V] from one unpadded full forward: nothing shared with the batched path."""
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits[0].float()


# ----------------------------------------------------------------------------------------------
# pure functions


def test_options_from_topk_zeroes_absent_options_and_renormalises():
    topk_ids = torch.tensor([[7, 11, 12, 99], [50, 60, 70, 80], [12, 10, 99, 11]])
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    choice_ids = torch.tensor([10, 11, 12, 13])  # letters A B C D
    n_choices = torch.tensor([4, 3, 2])
    got = S.options_from_topk(topk_ids, probs, choice_ids, n_choices)
    np.testing.assert_allclose(got[0].numpy(), [0.0, 0.6, 0.4, 0.0], rtol=1e-6)  # A, D not in the top-k
    np.testing.assert_allclose(got[1].numpy(), [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=1e-6)  # none: uniform over 3
    # item 3 has 2 options (A, B): C's probability 0.4 is not an option of it
    np.testing.assert_allclose(got[2].numpy(), [0.3 / 0.4, 0.1 / 0.4, 0.0, 0.0], rtol=1e-6)


def test_options_from_logits_masks_missing_options():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 30.0]])
    got = S.options_from_logits(logits, torch.tensor([3, 2]))
    np.testing.assert_allclose(got[0].numpy(), torch.softmax(logits[0], 0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), [*torch.softmax(logits[1, :2], 0).numpy(), 0.0], rtol=1e-6)


def test_default_label_skips_generic_folder_names():
    assert E.default_label("runs/student-first/model") == "student-first"
    assert E.default_label("runs/kd/checkpoints/step-200/") == "kd"
    assert E.default_label("cache/csqa-val.zarr", " teacher raw") == "csqa-val teacher raw"
    assert E.default_label("Qwen/Qwen2.5-0.5B") == "Qwen2.5-0.5B"


# ----------------------------------------------------------------------------------------------
# models


def test_mcqa_model_matches_unpadded_full_forward(tiny, tmp_path):
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(tiny["model_dir"]), "--data", str(tiny["mcqa"]), "--out", str(out),
                 "--batch-size", "4", "--label", "tiny"]) == 0
    metrics, lines = read_outputs(out)
    tokenized, info = prepare_dataset(DataConfig(data=str(tiny["mcqa"])), tiny["tokenizer"])
    assert [x["id"] for x in lines] == tokenized["id"]  # data order, although batches are length-sorted
    conf, correct, probs_all, golds = [], [], [], []
    for row, line in zip(tokenized, lines):
        logits = oracle_logits(tiny["model"], row["input_ids"])[row["target_start"] - 1]
        letters = info["choice_token_ids"][: row["n_choices"]]
        assert row["input_ids"][row["target_start"]] == letters[row["answer_index"]]  # gold letter is the target
        p = torch.softmax(logits[letters], 0).numpy()
        assert list(line["option_probs"]) == list("ABCDE"[: row["n_choices"]])
        np.testing.assert_allclose(list(line["option_probs"].values()), p, rtol=1e-4, atol=1e-6)
        assert line["prediction"] == "ABCDE"[int(p.argmax())] and line["gold"] == "ABCDE"[row["answer_index"]]
        assert line["p_pred_full"] == pytest.approx(float(torch.softmax(logits, 0)[letters[int(p.argmax())]]), rel=1e-4)
        conf.append(p.max())
        correct.append(p.argmax() == row["answer_index"])
        probs_all.append(np.pad(p, (0, 5 - len(p))))
        golds.append(row["answer_index"])
    conf, correct = np.array(conf), np.array(correct, dtype=float)
    assert metrics["n"] == 11 and metrics["level"] == "answer" and metrics["source"] == "model"
    assert metrics["label"] == "tiny" and metrics["n_bins"] == 10
    assert metrics["accuracy"] == pytest.approx(correct.mean())
    assert metrics["mean_confidence"] == pytest.approx(conf.mean(), rel=1e-5)
    assert metrics["ece"] == pytest.approx(M.expected_calibration_error(conf, correct), abs=1e-5)
    summary = M.calibration_summary(np.array(probs_all) / np.array(probs_all).sum(1, keepdims=True), golds)
    for key in ("brier", "nll", "mce"):
        assert metrics[key] == pytest.approx(summary[key], rel=1e-4, abs=1e-6), key
    assert sum(metrics["bins"]["count"]) == 11
    _check_full_vocabulary_block(metrics["full_vocabulary"], tokenized, info, tiny["model"])


def _check_full_vocabulary_block(block: dict, tokenized, info: dict, model) -> None:
    """The model's own next-token probabilities of the letters, scored without renormalising, from the
    formulas: confidence = full probability of the best option; Brier over the options plus 'anything
    else'; NLL = -log of the gold letter's full probability; mass = sum over the item's letters."""
    conf, correct, brier, nll, mass = [], [], [], [], []
    for row in tokenized:
        logits = oracle_logits(model, row["input_ids"])[row["target_start"] - 1]
        q = torch.softmax(logits.double(), 0)[info["choice_token_ids"][: row["n_choices"]]].numpy()
        y = row["answer_index"]
        conf.append(q.max())
        correct.append(float(q.argmax() == y))
        brier.append(((q - np.eye(len(q))[y]) ** 2).sum() + (1 - q.sum()) ** 2)
        nll.append(-np.log(q[y]))
        mass.append(q.sum())
    conf, correct = np.array(conf), np.array(correct)
    assert block["n"] == len(conf)
    assert block["accuracy"] == pytest.approx(correct.mean())
    assert block["mean_confidence"] == pytest.approx(conf.mean(), rel=1e-5)
    assert block["ece"] == pytest.approx(M.expected_calibration_error(conf, correct), abs=1e-5)
    for key, values in (("brier", brier), ("nll", nll), ("mean_options_mass", mass)):
        assert block[key] == pytest.approx(float(np.mean(values)), rel=1e-4, abs=1e-7), key


def test_prompt_response_model_is_scored_per_token(tiny, tmp_path):
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(tiny["model_dir"]), "--data", str(tiny["alpaca"]), "--out", str(out),
                 "--batch-size", "3"]) == 0
    metrics, lines = read_outputs(out)
    tokenized, _ = prepare_dataset(DataConfig(data=str(tiny["alpaca"])), tiny["tokenizer"])
    conf, correct, p_gold = [], [], []
    for row, line in zip(tokenized, lines):
        ids = row["input_ids"]
        probs = torch.softmax(oracle_logits(tiny["model"], ids), -1)[row["target_start"] - 1: len(ids) - 1]
        targets = torch.tensor(ids[row["target_start"]:])
        c, pred = probs.max(-1)
        assert line["id"] == row["id"] and line["n_tokens"] == len(targets)
        assert line["token_accuracy"] == pytest.approx(float((pred == targets).float().mean()))
        assert line["mean_confidence"] == pytest.approx(float(c.mean()), rel=1e-4)
        conf += c.tolist()
        correct += (pred == targets).tolist()
        p_gold += probs.gather(1, targets[:, None])[:, 0].tolist()
    assert metrics["level"] == "token" and metrics["n"] == len(conf)
    assert metrics["accuracy"] == pytest.approx(np.mean(correct))
    assert metrics["ece"] == pytest.approx(M.expected_calibration_error(conf, correct), abs=1e-5)
    assert metrics["nll"] == pytest.approx(-np.mean(np.log(p_gold)), rel=1e-4)
    assert metrics["nll_scope"] == "all"


# ----------------------------------------------------------------------------------------------
# stores


@pytest.fixture(scope="module")
def full_store(tiny):
    """The tiny model's MCQA and prompt-response stores with k = the whole vocabulary."""
    vocab = tiny["model"].config.vocab_size
    paths = {}
    for kind in ("mcqa", "alpaca"):
        paths[kind] = tiny["root"] / f"{kind}-full.zarr"
        assert main(["cache", "--teacher", str(tiny["model_dir"]), "--data", str(tiny[kind]), "--out",
                     str(paths[kind]), "--k", str(vocab), "--dtype", "float32"]) == 0
    return paths


@pytest.mark.parametrize("kind", ["mcqa", "alpaca"])
def test_full_vocabulary_store_agrees_with_the_model(tiny, full_store, tmp_path, kind):
    # With k = V the cached distribution is the model's own (up to fp16 storage), so the store path and the
    # model path, which share no code beyond the metrics, must give the same answers.
    assert main(["evaluate", "--store", str(full_store[kind]), "--out", str(tmp_path / "s")]) == 0
    assert main(["evaluate", "--model", str(tiny["model_dir"]), "--data", str(tiny[kind]), "--out",
                 str(tmp_path / "m")]) == 0
    (ms, ls), (mm, lm) = read_outputs(tmp_path / "s"), read_outputs(tmp_path / "m")
    assert ms["source"] == "store" and ms["temperature"] is None and ms["n"] == mm["n"]
    assert [x["id"] for x in ls] == [x["id"] for x in lm]
    for key in ("accuracy", "mean_confidence", "ece", "brier", "nll"):
        assert ms[key] == pytest.approx(mm[key], abs=2e-3), key
    if kind == "mcqa":
        for a, b in zip(ls, lm):
            assert a["prediction"] == b["prediction"]
            np.testing.assert_allclose(list(a["option_probs"].values()), list(b["option_probs"].values()), atol=2e-3)
            assert a["options_in_topk"] == len(a["option_probs"])
        # The full-vocabulary scoring too: the cached teacher (k = V) is the model.
        for key in ("accuracy", "mean_confidence", "ece", "brier", "nll", "mean_options_mass"):
            assert ms["full_vocabulary"][key] == pytest.approx(mm["full_vocabulary"][key], abs=2e-3), key
    else:
        assert "full_vocabulary" not in ms and "full_vocabulary" not in mm  # token level is full-vocabulary already


@pytest.fixture(scope="module")
def top5_store(tiny):
    path = tiny["root"] / "mcqa-top5.zarr"
    assert main(["cache", "--teacher", str(tiny["model_dir"]), "--data", str(tiny["mcqa"]), "--out", str(path)]) == 0
    return path


def test_store_options_and_temperature_flag(top5_store, tmp_path, capsys):
    # a temperature record that sharpens a lot, so the two evaluations must differ
    record = {"form": "logit", "value": 0.05}
    set_temperature(top5_store, record)
    assert main(["evaluate", "--store", str(top5_store), "--out", str(tmp_path / "t")]) == 0
    assert main(["evaluate", "--store", str(top5_store), "--out", str(tmp_path / "raw"), "--no-temperature"]) == 0
    (mt, lt), (mr, lr) = read_outputs(tmp_path / "t"), read_outputs(tmp_path / "raw")
    assert mt["temperature"] == record and mr["temperature"] is None
    assert "logit T=0.05" in mt["label"] and mr["label"].endswith("teacher raw")
    assert mt["mean_confidence"] > mr["mean_confidence"]
    # the case this test is about: options partly inside the top-5
    assert any(0 < x["options_in_topk"] < len(x["option_probs"]) for x in lr)
    store = open_store(top5_store)
    letters = store.attrs["data"]["choice_token_ids"]
    for i, (a, b) in enumerate(zip(lt, lr)):
        for line, temp in ((a, True), (b, False)):
            rec = store.get(i, temperature=temp)
            n = rec["n_choices"]
            mass = np.array([rec["teacher_probs"][0][rec["topk_ids"][0] == t].sum() for t in letters[:n]])
            expected = mass / mass.sum() if mass.sum() > 0 else np.full(n, 1 / n)
            np.testing.assert_allclose(list(line["option_probs"].values()), expected, rtol=1e-5, atol=1e-7)
            assert line["options_in_topk"] == int((mass > 0).sum())
    set_temperature(top5_store, {})
    assert main(["evaluate", "--store", str(top5_store), "--out", str(tmp_path / "none")]) == 0
    assert "no temperature record" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--store", "s.zarr", "--model", "m"], "not both"),
    (["--store", "s.zarr", "--data", "d.jsonl"], "drop --data"),
    (["--model", "m"], "--data"),
    ([], "--model"),
    (["--store", "missing.zarr"], "store not found"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    assert main(["evaluate", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "metrics.json").exists()


# ----------------------------------------------------------------------------------------------
# the output directory: same command twice, other settings, failed writes


def test_same_command_twice_is_a_no_op_and_other_settings_are_refused(top5_store, tmp_path, capsys, monkeypatch):
    out = tmp_path / "e"
    args = ["evaluate", "--store", str(top5_store), "--no-temperature", "--out", str(out)]
    assert main(args) == 0
    before = file_bytes(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(args + ["--batch-size", "3"]) == 0  # how it runs is not a setting
    err = capsys.readouterr().err
    assert "nothing to do" in err and str(out) in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    assert main(args + ["--n-bins", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "n_bins: 10 -> 5" in err and "--overwrite" in err, err
    assert file_bytes(out) == before

    # A new label renames the evaluation without measuring again.
    monkeypatch.setattr(E, "evaluate_store", lambda *a, **k: pytest.fail("measured again for a new label"))
    assert main(args + ["--label", "renamed"]) == 0
    metrics, lines = read_outputs(out)
    old = json.loads(before["metrics.json"])
    assert metrics["label"] == "renamed" and {**metrics, "label": old["label"]} == old
    assert file_bytes(out)["predictions.jsonl"] == before["predictions.jsonl"]
    assert file_bytes(out)["reliability.png"] != before["reliability.png"]  # the title names the new label
    monkeypatch.undo()

    assert main(args + ["--n-bins", "5", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["n_bins"] == 5 and leftovers(tmp_path) == []


def test_changed_inputs_and_foreign_files_are_refused(tiny, top5_store, tmp_path, capsys):
    import os
    import shutil

    store = tmp_path / "store.zarr"
    shutil.copytree(top5_store, store)
    set_temperature(store, {"form": "logit", "value": 0.5})
    out = tmp_path / "e"
    args = ["evaluate", "--store", str(store), "--out", str(out), "--label", "t"]
    assert main(args) == 0
    before = file_bytes(out)
    set_temperature(store, {"form": "logit", "value": 2.0})  # calibrated again since
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "store_temperature" in err and "2.0" in err, err
    assert file_bytes(out) == before

    # A model retrained into the same directory is another input.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny["model_dir"], model_dir)
    margs = ["evaluate", "--model", str(model_dir), "--data", str(tiny["mcqa"]), "--out", str(tmp_path / "m")]
    assert main(margs) == 0
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten: a new modification time, even on a coarse clock
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**10))
    capsys.readouterr()
    assert main(margs) == 2 and "model_files" in capsys.readouterr().err

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["evaluate", "--store", str(store), "--out", str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.txt" in err, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_full_disk_keeps_the_finished_evaluation(top5_store, tmp_path):
    out = tmp_path / "e"
    assert main(["evaluate", "--store", str(top5_store), "--no-temperature", "--out", str(out)]) == 0
    before = file_bytes(out)
    # a small disk: predictions.jsonl and metrics.json fit, the figure does not
    limit = max(len(before["predictions.jsonl"]), len(before["metrics.json"])) + 4096
    assert limit < len(before["reliability.png"])
    run = run_cli(["evaluate", "--store", str(top5_store), "--no-temperature", "--n-bins", "5", "--overwrite",
                   "--out", str(out)], env={"OMP_NUM_THREADS": "1"}, limit_bytes=limit, timeout=300)
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert ("File too large" in err[-1] or "EFBIG" in err[-1]) and "reliability.png" in err[-1], run.stderr
    assert file_bytes(out) == before and leftovers(tmp_path) == []


def test_unwritable_out_is_one_line(top5_store, tmp_path, capsys):
    parent_is_file = tmp_path / "file"
    parent_is_file.write_text("")
    for out, named in ((unwritable(tmp_path), "first-kd-test-unwritable"), (parent_is_file / "e", str(parent_is_file))):
        assert main(["evaluate", "--store", str(top5_store), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err and "error" in err, err
