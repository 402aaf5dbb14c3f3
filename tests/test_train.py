"""`first-kd distill` end to end on 2-layer tiny Llama models (CPU, seconds each).

What is checked, and against what:
  * every loss trains: the logged loss falls on a learnable task, OUT/model reloads with
    from_pretrained, config.yaml round-trips the options, metrics.jsonl has one line per logged step;
  * validation numbers equal an independent oracle: full HF logits of the student, the teacher top-k
    read from the store and the temperature applied by hand, KL/CE written out here;
  * resume after SIGKILL of a subprocess gives bitwise the same weights and losses as a run that was
    never interrupted; a finished run is not retrained;
  * grad accumulation 2 x b takes the same steps as one batch of 2b on sequences of unequal length
    (where averaging per micro-batch would weigh positions differently);
  * NaN / inf stop the run with a one-line error and leave the last good checkpoint intact;
  * tokenizer guards; the CLI with --config YAML + key=value + flag overrides and its one-line errors.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import first_kd.commands.distill as train_mod
import first_kd.training as training_mod
from first_kd.errors import FirstKDError
from first_kd.commands.distill import DistillConfig, run_distill
from helpers import LETTERS, WORDS, file_bytes, leftovers, run_cli, unwritable, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TEMPERATURE = {"form": "prob", "value": 0.5}


# One torch thread for the module (conftest); subprocesses get OMP_NUM_THREADS=1 to match.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    """Tiny student and teacher (same tokenizer), data files and teacher stores, built once."""
    from first_kd.store import set_temperature
    from first_kd.commands.cache import CacheConfig, run_cache
    from first_kd.tiny import build_llama

    root = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    # Copy task with responses of 1..6 words: learnable, and sequences of unequal length.
    copy_rows = []
    for i in range(32):
        words = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
        copy_rows.append({"id": f"c{i}", "prompt": f"copy: {words}\n", "response": words})
    mc_rows = []
    for i in range(32):
        options = rng.sample(WORDS, 5)
        gold = rng.randrange(5)
        mc_rows.append({"id": f"q{i}", "question": f"which is {options[gold]}?", "choices": options,
                        "answer": LETTERS[gold]})
    w = {"root": root, "tok": tiny_tokenizer}
    w["copy"] = write_jsonl(root / "copy.jsonl", copy_rows)
    w["mc_train"] = write_jsonl(root / "mc_train.jsonl", mc_rows[:24])
    w["mc_val"] = write_jsonl(root / "mc_val.jsonl", mc_rows[24:])
    w["student"] = build_llama(root / "student", tiny_tokenizer, hidden_size=64, num_layers=2, seed=0)
    w["teacher"] = build_llama(root / "teacher", tiny_tokenizer, hidden_size=64, num_layers=2, seed=1)
    w["store"] = root / "copy.zarr"
    w["val_store"] = root / "mc_val.zarr"
    run_cache(CacheConfig(teacher=str(w["teacher"]), data=str(w["copy"]), out=str(w["store"])))
    run_cache(CacheConfig(teacher=str(w["teacher"]), data=str(w["mc_val"]), out=str(w["val_store"])))
    w["store_t"] = root / "copy-calibrated.zarr"
    shutil.copytree(w["store"], w["store_t"])
    set_temperature(w["store_t"], TEMPERATURE)
    return w


def _cfg(w, out: Path, **kw) -> DistillConfig:
    values = dict(student=str(w["student"]), out=str(out), loss="kd", store=str(w["store"]), max_steps=4,
                  batch_size=4, lr=3e-3, warmup=0, log_every=1, save_every=0, seed=0)
    values.update(kw)
    return DistillConfig(**values)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


# ----------------------------------------------------------------------------------------------
# Config guards (no training)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, needle", [
    (dict(loss="first", store=None), "needs --store"),
    (dict(loss="kd", store=None), "needs --store"),
    (dict(loss="ce", store=None, data=None), "needs --data"),
    (dict(alpha=1.5), "--alpha"),
    (dict(grad_accum=0), "--grad-accum"),
    (dict(val_store="a", val_data="b"), "not both"),
])
def test_config_errors_are_one_line(kw, needle):
    values = dict(student="s", out="o", loss="kd", store="x.zarr")
    values.update(kw)
    with pytest.raises(FirstKDError) as e:
        DistillConfig(**values).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Each loss end to end
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["first", "kd", "ce"])
def test_each_loss_trains_and_saves_a_loadable_model(world, tmp_path, loss, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / loss
    if loss == "ce":  # plain fine-tuning from a data file, validated on held-out multiple-choice data
        cfg = _cfg(world, out, loss="ce", store=None, data=str(world["copy"]), val_data=str(world["mc_val"]),
                   max_steps=24, eval_every=12)
    else:
        store = world["store_t"] if loss == "first" else world["store"]
        cfg = _cfg(world, out, loss=loss, store=str(store), val_store=str(world["val_store"]), max_steps=24,
                   eval_every=12)
    assert run_distill(cfg) == 0
    assert "no temperature record" not in capsys.readouterr().err  # the calibrated store was used

    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[0])
    assert all(r["tokens_per_s"] > 0 for r in rows)
    first3 = sum(r["loss"] for r in rows[:3]) / 3
    last3 = sum(r["loss"] for r in rows[-3:]) / 3
    assert last3 < 0.7 * first3, (first3, last3)
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [12, 24]
    # answer-level validation on the 8 val questions: a count of right answers, and an ECE no smaller than
    # the gap between accuracy and mean confidence (the bins' gaps add up to at least that)
    last = vals[-1]
    assert vals[0]["val_level"] == "answer" and last["val_n"] == 8 and (last["val_accuracy"] * 8).is_integer()
    assert last["val_ece"] >= abs(last["val_accuracy"] - last["val_mean_confidence"]) - 1e-9

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == yaml.safe_load(yaml.safe_dump(train_mod.to_dict(cfg)))
    assert json.loads((out / "summary.json").read_text())["steps"] == 24
    assert not (out / "checkpoints").exists()  # dropped after success unless --keep-checkpoints

    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    tok = AutoTokenizer.from_pretrained(str(out / "model"))
    assert len(tok) == len(world["tok"])
    initial = _weights(world["student"])
    trained = _weights(out / "model")
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("copy: cat dog\n")])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_first_without_temperature_warns_and_equals_kd(world, tmp_path, capsys):
    run_distill(_cfg(world, tmp_path / "first", loss="first", store=str(world["store"])))
    assert "no temperature record" in capsys.readouterr().err
    run_distill(_cfg(world, tmp_path / "kd", loss="kd", store=str(world["store"])))
    a, b = _weights(tmp_path / "first" / "model"), _weights(tmp_path / "kd" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw, warned", [
    (dict(), False),  # the default other bucket ties the student's mass on the top-k to the teacher's
    (dict(other_bucket=False), True),  # renormalised top-k KL: nothing constrains the other tokens
    (dict(other_bucket=False, store="mc"), True),  # multiple choice too: the letters' full mass is free
    (dict(other_bucket=False, alpha=0.5), False),
    (dict(other_bucket=False, student_norm="prob-softmax"), False),  # absolute probabilities: mass is held
])
def test_renormalised_kl_without_bucket_or_ce_warns(world, tmp_path, capsys, kw, warned):
    if kw.get("store") == "mc":
        kw = dict(kw, store=str(world["val_store"]))
    run_distill(_cfg(world, tmp_path / "run", max_steps=1, **kw))
    assert ("--no-other-bucket" in capsys.readouterr().err) == warned


def test_store_with_dropped_steps_warns_kl_students(world, tmp_path, capsys):
    import zarr

    store = tmp_path / "dual.zarr"
    shutil.copytree(world["store"], store)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["data"] = {**group.attrs["data"], "trace_levels": [0.0, 0.5, 1.0]}
    run_distill(_cfg(world, tmp_path / "kd", store=str(store), other_bucket=True, max_steps=1))
    assert "dropped steps" in capsys.readouterr().err
    group.attrs["data"] = {**group.attrs["data"], "trace_levels": [0.0, 1.0]}
    run_distill(_cfg(world, tmp_path / "kd2", store=str(store), other_bucket=True, max_steps=1))
    assert "dropped steps" not in capsys.readouterr().err


def _oracle(w, record: dict, loss: str, bucket: bool = True) -> dict:
    """Validation numbers computed independently: full logits from the HF forward, the teacher top-k
    read raw from the store, the temperature applied by hand, KL / CE spelled out. With the bucket (the
    default) both sides get a (k+1)-th category: the teacher's own rest mass, the student's full-vocabulary
    mass outside the ids; without it both are renormalised over the ids."""
    from transformers import AutoModelForCausalLM

    from first_kd.metrics import calibration_summary
    from first_kd.store import open_store

    model = AutoModelForCausalLM.from_pretrained(str(w["student"])).eval()
    store = open_store(w["val_store"])
    choice_ids = store.attrs["data"]["choice_token_ids"]
    kl = ce = 0.0
    n = 0
    probs, labels = [], []
    for i in range(len(store)):
        r = store.get(i, temperature=False)
        ids = torch.tensor(r["input_ids"])[None]
        with torch.no_grad():
            logits = model(ids).logits[0].double()  # [S, V]
        pos = torch.tensor(r["target_positions"])
        z = logits[pos]
        p_raw = torch.tensor(r["topk_logprobs"], dtype=torch.float64).exp()
        if record:  # FIRST's prob form: softmax over the top-k probabilities divided by c
            p = torch.softmax(p_raw / record["value"], dim=-1)
        else:
            p = p_raw / p_raw.sum(-1, keepdim=True)
        if bucket:
            rest = 1 - p_raw.sum(-1, keepdim=True)
            p = torch.cat([p * (1 - rest), rest], dim=-1)
            q = torch.softmax(z, dim=-1).gather(1, torch.tensor(r["topk_ids"]))
            log_q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], dim=-1).log()
        else:
            log_q = torch.log_softmax(z.gather(1, torch.tensor(r["topk_ids"])), dim=-1)
        kl += float((p * (p.log() - log_q)).sum())
        ce += float(torch.nn.functional.cross_entropy(z, ids[0, pos + 1], reduction="sum"))
        n += len(pos)
        probs.append(torch.softmax(z[0, choice_ids[: r["n_choices"]]], -1).tolist())
        labels.append(r["answer_index"])
    summary = calibration_summary(torch.tensor(probs).numpy(), torch.tensor(labels).numpy())
    return {"val_loss": (ce if loss == "ce" else kl) / n, "val_ce": ce / n, "val_accuracy": summary["accuracy"],
            "val_ece": summary["ece"]}


@pytest.mark.slow
@pytest.mark.parametrize("loss, store_key, record, bucket", [
    ("first", "store_t", TEMPERATURE, True), ("first", "store_t", TEMPERATURE, False), ("kd", "store_t", {}, True),
    ("ce", "store", {}, True),
])
def test_validation_matches_independent_oracle(world, tmp_path, loss, store_key, record, bucket):
    # lr 1e-30 leaves the fp32 weights unchanged, so the end-of-run validation sees the initial student.
    cfg = _cfg(world, tmp_path / loss, loss=loss, store=str(world[store_key]), val_store=str(world["val_store"]),
               max_steps=1, lr=1e-30, other_bucket=bucket)
    run_distill(cfg)
    got = _metrics(tmp_path / loss)[-1]
    want = _oracle(world, record, loss, bucket)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    if loss == "first":  # the temperature changed the target: first != kd on a calibrated store
        assert want["val_loss"] != pytest.approx(_oracle(world, {}, "kd", bucket)["val_loss"], rel=0.05)


# ----------------------------------------------------------------------------------------------
# Resume, accumulation, divergence
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(world, tmp_path, capsys):
    options = dict(student=str(world["student"]), loss="first", store=str(world["store_t"]), max_steps=24,
                   batch_size=2, grad_accum=2, lr=3e-3, warmup=3, save_every=3, log_every=1, seed=3)
    out = tmp_path / "killed"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"distill": dict(options, out=str(out))}))
    # One thread like this process (fixture one_torch_thread), so the in-process reference run reduces in
    # the same order; PYTHONPATH so the subprocess imports this checkout whatever the install.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "first_kd.cli", "distill", "--config", str(recipe)]

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, err
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert killed_at < 24

    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr

    reference = tmp_path / "reference"
    run_distill(DistillConfig(**options, out=str(reference)))
    a, b = _weights(out / "model"), _weights(reference / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    got, want = _metrics(out), _metrics(reference)
    assert [r["step"] for r in got] == list(range(1, 25))  # each step logged once despite the kill
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in got] == [(r["loss"], r["lr"], r["grad_norm"]) for r in want]

    # A finished run is not retrained.
    stamp = (reference / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert run_distill(DistillConfig(**options, out=str(reference))) == 0
    assert "already holds a finished run" in capsys.readouterr().err
    assert (reference / "model" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch(world, tmp_path):
    # Copy-task sequences have 2..7 target positions, so micro-batches hold unequal counts: only
    # normalising by the count of the whole accumulated step reproduces the big batch.
    lengths = {len(json.loads(line)["response"].split()) for line in world["copy"].read_text().splitlines()}
    assert len(lengths) > 2
    common = dict(loss="ce", store=None, data=str(world["copy"]), max_steps=3, lr=1e-3, max_grad_norm=0)
    run_distill(_cfg(world, tmp_path / "big", batch_size=8, grad_accum=1, **common))
    run_distill(_cfg(world, tmp_path / "accum", batch_size=2, grad_accum=4, **common))
    big, accum = _metrics(tmp_path / "big"), _metrics(tmp_path / "accum")
    for r_big, r_acc in zip(big, accum):
        assert r_acc["loss"] == pytest.approx(r_big["loss"], rel=1e-5)
        assert r_acc["grad_norm"] == pytest.approx(r_big["grad_norm"], rel=1e-4)
    a, b = _weights(tmp_path / "big" / "model"), _weights(tmp_path / "accum" / "model")
    # Adam moves every weight by ~lr per step; agreement far below that means the same steps.
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path, monkeypatch):
    real_loss = training_mod.chunked_distillation_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # one micro-batch per step: call 5 is step 5
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    options = dict(max_steps=8, schedule="constant", save_every=2)
    out = tmp_path / "nan"
    monkeypatch.setattr(training_mod, "chunked_distillation_loss", poisoned)
    with pytest.raises(FirstKDError) as e:
        run_distill(_cfg(world, out, **options))
    message = str(e.value)
    assert "\n" not in message and "nan" in message and "step 5" in message
    assert "step-00000004" in message
    monkeypatch.setattr(training_mod, "chunked_distillation_loss", real_loss)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    assert not (out / "model").exists() and not (out / "summary.json").exists()

    # Intact: the checkpoint holds exactly the weights of a clean 4-step run (constant lr).
    clean = tmp_path / "clean4"
    run_distill(_cfg(world, clean, **dict(options, max_steps=4)))
    from safetensors.torch import load_file

    ckpt = load_file(str(out / "checkpoints" / "step-00000004" / "model.safetensors"))
    ref = _weights(clean / "model")
    assert all(torch.equal(ckpt[k], ref[k]) for k in ref)
    # And re-running resumes from it and finishes.
    assert run_distill(_cfg(world, out, **options)) == 0
    assert [r["step"] for r in _metrics(out)] == list(range(1, 9))


@pytest.mark.slow
def test_exploding_lr_stops_with_one_line_error(world, tmp_path):
    with pytest.raises(FirstKDError) as e:
        run_distill(_cfg(world, tmp_path / "boom", lr=1e30, max_steps=6))
    message = str(e.value)
    assert "\n" not in message and "no checkpoint was saved yet" in message and "--lr" in message
    assert not (tmp_path / "boom" / "model").exists()


# ----------------------------------------------------------------------------------------------
# Tokenizer guards
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tokenizer_mismatch_refused_and_padded_vocab_accepted(world, tmp_path):
    from first_kd.tiny import build_llama, train_tokenizer

    other_tok = train_tokenizer([f"{a} {b} {c}" for a in WORDS for b in WORDS for c in "xyz"], vocab_size=300)
    other = build_llama(tmp_path / "other", other_tok, hidden_size=32, num_layers=2)
    with pytest.raises(FirstKDError, match="does not match"):
        run_distill(_cfg(world, tmp_path / "mismatch", student=str(other)))
    assert not (tmp_path / "mismatch" / "model").exists()

    small = build_llama(tmp_path / "small", world["tok"], hidden_size=32, num_layers=2, vocab_size=200)
    with pytest.raises(FirstKDError, match="output logits"):
        run_distill(_cfg(world, tmp_path / "small-out", student=str(small)))

    padded_vocab = len(world["tok"]) + 64
    padded = build_llama(tmp_path / "padded", world["tok"], hidden_size=32, num_layers=2, vocab_size=padded_vocab)
    assert run_distill(_cfg(world, tmp_path / "padded-out", student=str(padded), max_steps=2)) == 0
    assert _weights(tmp_path / "padded-out" / "model")["lm_head.weight"].shape[0] == padded_vocab


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_yaml_with_overrides_and_one_line_errors(world, tmp_path, capsys):
    from first_kd.cli import main

    out = tmp_path / "cli"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "cache": {"teacher": "ignored-by-distill"},
        "distill": {"student": str(world["student"]), "loss": "ce", "data": str(world["mc_train"]),
                    "max_steps": 100, "lr": 0.5, "batch_size": 4, "warmup": 0, "out": str(tmp_path / "wrong")},
    }))
    args = ["distill", "--config", str(recipe), "--max-steps", "3", "lr=0.001", "--out", str(out)]
    assert main(args) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["max_steps"], saved["lr"], saved["out"], saved["batch_size"]) == (3, 0.001, str(out), 4)
    assert [r["step"] for r in _metrics(out)][-1] == 3
    assert not (tmp_path / "wrong").exists()

    capsys.readouterr()
    assert main(args[:-2] + ["lr=0.002", "--out", str(out)]) == 2  # another run's options in the same OUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different options" in err and "--overwrite" in err and "lr" in err

    before = (out / "model" / "model.safetensors").read_bytes()
    assert main(args[:-2] + ["lr=0.002", "--out", str(out), "--overwrite"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.002
    assert (out / "model" / "model.safetensors").read_bytes() != before

    capsys.readouterr()
    assert main(["distill", "--student", str(world["student"]), "--out", str(tmp_path / "x"), "--loss", "first"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs --store" in err

    assert main(["distill", "--student", str(world["student"]), "--out", str(tmp_path / "y"), "--loss", "kd",
                 "--store", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def test_unloadable_student_is_a_one_line_error(tmp_path):
    with pytest.raises(FirstKDError) as e:
        run_distill(DistillConfig(student=str(tmp_path / "no-such-model"), out=str(tmp_path / "o"), loss="ce",
                                  data=str(tmp_path / "x.jsonl")))
    assert "no-such-model" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o" / "model").exists()


# ----------------------------------------------------------------------------------------------
# The run directory: same command twice, --overwrite, failed writes
# ----------------------------------------------------------------------------------------------


def _cli_args(w, out: Path, **kw) -> list[str]:
    options = dict(student=w["student"], loss="kd", store=w["store"], max_steps=2, batch_size=4, warmup=0,
                   save_every=0, out=out)
    options.update(kw)
    return ["distill"] + [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.slow
def test_overwrite_with_a_broken_student_or_store_keeps_the_finished_run(world, tmp_path, capsys):
    from first_kd.cli import main

    out = tmp_path / "run"
    assert main(_cli_args(world, out)) == 0
    before = file_bytes(out, recursive=True)
    student = tmp_path / "truncated-student"
    shutil.copytree(world["student"], student)
    weights = student / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    store = tmp_path / "damaged.zarr"
    shutil.copytree(world["store"], store)
    next(p for p in sorted((store / "topk_logprobs").rglob("*")) if p.is_file() and p.name != "zarr.json").unlink()
    capsys.readouterr()
    for broken in (dict(student=student), dict(store=store)):
        assert main(_cli_args(world, out, **broken) + ["--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("truncated-student" in err or "damaged" in err), err
        assert file_bytes(out, recursive=True) == before  # the finished run, byte for byte
        assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_overwrite_killed_before_it_finishes_leaves_the_old_run(world, tmp_path, capsys):
    from first_kd.cli import main

    out = tmp_path / "run"
    assert main(_cli_args(world, out)) == 0
    (out / "notes.txt").write_text("mine")  # a user's file in the run directory
    before = file_bytes(out, recursive=True)
    new = _cli_args(world, out, lr=1e-3) + ["--overwrite"]
    killed = run_cli(new, env={"OMP_NUM_THREADS": "1", "FIRST_KD_CRASH_AT": "distill:before-replace"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert file_bytes(out, recursive=True) == before  # the new run had finished training, but had not replaced the old one
    capsys.readouterr()
    assert main(_cli_args(world, out, lr=1e-3)) == 2  # without --overwrite: still the old run's options
    assert "different options" in capsys.readouterr().err
    assert main(new) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 1e-3
    assert json.loads((out / "summary.json").read_text())["model"] == str(out / "model")
    assert (out / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []
    assert main(new[:-1]) == 0 and "nothing to do" in capsys.readouterr().err  # the same command again


@pytest.mark.slow
def test_finished_first_run_is_a_no_op_until_its_store_is_calibrated_again(world, tmp_path, capsys):
    from first_kd.cli import main
    from first_kd.store import set_temperature

    store = tmp_path / "calibrated.zarr"
    shutil.copytree(world["store_t"], store)
    out = tmp_path / "first"
    args = _cli_args(world, out, loss="first", store=store)
    assert main(args) == 0
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().err
    set_temperature(store, {**TEMPERATURE, "value": 0.7})
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0.5" in err and "0.7" in err and "--overwrite" in err, err
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_full_disk_while_checkpointing_is_one_line_and_loses_nothing(world, tmp_path):
    out = tmp_path / "run"
    env = {"OMP_NUM_THREADS": "1"}
    assert run_cli(_cli_args(world, out), env=env).returncode == 0
    before = file_bytes(out, recursive=True)
    # a small disk: files may not grow past half a checkpoint (config.yaml fits, model.safetensors does not)
    small_disk = (world["student"] / "model.safetensors").stat().st_size // 2

    for extra in (["--overwrite"], []):  # replacing the finished run; a new run that checkpoints
        target = out if extra else tmp_path / "fresh"
        full = run_cli(_cli_args(world, target, lr=1e-3, max_steps=4, save_every=2) + extra, env=env,
                       limit_bytes=small_disk, timeout=300)
        err = full.stderr.strip().splitlines()[-1:]
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
        assert err and "checkpoints" in err[0] and ("File too large" in err[0] or "EFBIG" in err[0]), full.stderr
        assert file_bytes(out, recursive=True) == before and leftovers(tmp_path) == []
    assert not (tmp_path / "fresh" / "summary.json").exists()
    assert not list((tmp_path / "fresh" / "checkpoints").glob("*"))  # no half-written checkpoint left


@pytest.mark.slow
def test_unwritable_run_directory_is_one_line(world, tmp_path, capsys, monkeypatch):
    from first_kd.cli import main

    monkeypatch.setattr(train_mod, "load_student", lambda *a, **k: pytest.fail("loaded the student first"))
    out = unwritable(tmp_path)
    parent_is_file = tmp_path / "file"
    parent_is_file.write_text("")
    for target, named in ((out, out.parent), (parent_is_file / "run", parent_is_file)):
        assert main(_cli_args(world, target) + ["--other-bucket"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(named) in err and "error" in err, err
