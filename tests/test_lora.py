"""LoRA students (`distill --lora-r R`): they learn, resume bit-identically after kill -9, and the merged
model (OUT/model) evaluates like the adapter (OUT/adapter); QLoRA is refused where it cannot run."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from first_kd.cli import main
from helpers import build_letter_sure_model, run_cli, write_mcqa

pytestmark = pytest.mark.slow
LORA = ["--lora-r", "8", "--lora-alpha", "16", "--loss", "kd", "--batch-size", "4", "--lr", "1e-2", "--warmup", "0",
        "--log-every", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    from first_kd.tiny import build_llama

    root = tmp_path_factory.mktemp("lora")
    # A teacher sure of the option letters: a target a low-rank update can learn in a few steps.
    teacher = build_letter_sure_model(root / "teacher", tiny_tokenizer)
    student = build_llama(root / "student", tiny_tokenizer, seed=1)
    data = write_mcqa(root / "train.jsonl", 32)
    test = write_mcqa(root / "test.jsonl", 24, seed=1)
    assert main(["cache", "--teacher", str(teacher), "--data", str(data), "--out", str(root / "train.zarr")]) == 0
    return {"root": root, "student": str(student), "store": str(root / "train.zarr"), "test": str(test)}


def distill_args(world, out, *extra) -> list[str]:
    return ["distill", "--student", world["student"], "--store", world["store"], "--out", str(out), *LORA, *extra]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_student_learns_and_trains_only_its_adapters(world):
    out = world["root"] / "learn"
    assert main(distill_args(world, out, "--max-steps", "40")) == 0
    losses = [r["loss"] for r in metrics(out)]
    assert sum(losses[-8:]) / 8 < 0.8 * losses[0], losses  # losses[0]: the untrained student's
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and os.path.isabs(config["base_model_name_or_path"])
    assert not (out / "model").exists()  # no --merge-lora: the adapter is the output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(out / "adapter")


def test_lora_resume_after_kill_is_bit_identical_and_merged_model_evaluates_alike(world):
    killed, reference = world["root"] / "killed", world["root"] / "reference"
    args = ["--max-steps", "12", "--save-every", "4", "--merge-lora"]
    env = {"OMP_NUM_THREADS": "1", "FIRST_KD_CRASH_AT": "distill:after-checkpoint:8"}
    first = run_cli(distill_args(world, killed, *args), env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    saved = load_file(str(killed / "checkpoints" / "step-00000008" / "model.safetensors"))
    assert saved and all("lora_" in name for name in saved)  # a LoRA checkpoint holds the adapters only
    resumed = run_cli(distill_args(world, killed, *args), env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    plain = run_cli(distill_args(world, reference, *args), env={"OMP_NUM_THREADS": "1"})
    assert plain.returncode == 0, plain.stderr[-2000:]
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(str(killed / name)), load_file(str(reference / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(reference)]

    # The merged model and the adapter (loaded on its base) give the same answers.
    results = {}
    for name in ("adapter", "model"):
        ev = world["root"] / f"eval-{name}"
        assert main(["evaluate", "--model", str(reference / name), "--data", world["test"], "--out", str(ev)]) == 0
        results[name] = json.loads((ev / "metrics.json").read_text())
        results[name + "_rows"] = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    for key in ("ece", "brier", "nll", "mean_confidence"):
        assert results["adapter"][key] == pytest.approx(results["model"][key], abs=1e-5), key
    for a, b in zip(results["adapter_rows"], results["model_rows"]):
        assert a["option_probs"] == pytest.approx(b["option_probs"], abs=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--merge-lora"], "--merge-lora needs LoRA adapters: set --lora-r"),
    (["--lora-r", "4", "--lora-target-modules", "no_such_proj"], "cannot add LoRA adapters"),
    (["--lora-r", "4", "--load-in-4bit"], "--load-in-4bit"),
])
def test_lora_options_fail_in_one_line(world, args, message, capsys):
    out = world["root"] / "refused"
    code = main(["distill", "--student", world["student"], "--store", world["store"], "--out", str(out),
                 "--loss", "kd", "--max-steps", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and len(err[-1]) < 300


@pytest.mark.parametrize("variable, what", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharded_launch_is_refused_in_one_line(world, variable, what, monkeypatch, capsys):
    # What `accelerate launch --use_fsdp / --use_deepspeed` sets. On a CPU host accelerate would fall back to
    # plain data parallel without a word; first-kd refuses before anything is written.
    monkeypatch.setenv(variable, "true")
    out = world["root"] / f"sharded-{what}"
    assert main(distill_args(world, out, "--max-steps", "1")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"first-kd distill: error: {what} sharding is not supported by first-kd distill yet")
    assert not out.exists()
