"""The teacher pass end to end: `first-kd cache` on a tiny Llama teacher.

Checks the cached top-k against a direct full forward, resume after SIGKILL at several points,
2 processes == 1 process, refusal to overwrite, and the bad-input errors (one line, nothing valid-looking
left behind).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from first_kd.cli import main
from first_kd.errors import FirstKDError
from first_kd.store import open_store

from helpers import build_peaked_model, mcqa_records, pr_records, read_only_dir, run_cli, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose output head is scaled up, so its distributions are peaked like a trained
    model's and top-k order is not decided by float noise."""
    path = build_peaked_model(tmp_path_factory.mktemp("teacher") / "model", tiny_tokenizer, hidden_size=64,
                              num_layers=2)
    return str(path)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"mcqa": write_jsonl(d / "mc.jsonl", mcqa_records(30)),
            "pr": write_jsonl(d / "pr.jsonl", pr_records(40))}


def cache(teacher, data, out, *extra):
    return main(["cache", "--teacher", teacher, "--data", str(data), "--out", str(out), *extra])


def read_arrays(path):
    group = zarr.open_group(str(path), mode="r")
    return {name: arr[:] for name, arr in group.arrays()}


def assert_stores_equal(a, b):
    arrays_a, arrays_b = read_arrays(a), read_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


@pytest.mark.parametrize("kind", ["mcqa", "pr"])
def test_topk_matches_direct_full_forward(tmp_path, teacher_dir, data_files, kind):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "s.zarr"
    assert cache(teacher_dir, data_files[kind], out, "--batch-size", "4") == 0
    store = open_store(out)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    for i in range(len(store)):
        rec = store.get(i)
        with torch.no_grad():
            logits = model(torch.from_numpy(rec["input_ids"])[None]).logits[0].float()
        logprobs = torch.log_softmax(logits, -1)[torch.from_numpy(rec["target_positions"])]
        values, ids = torch.topk(logprobs, store.k, dim=-1)
        np.testing.assert_array_equal(rec["topk_ids"], ids.numpy())
        np.testing.assert_allclose(rec["topk_logprobs"], values.numpy(), rtol=2 ** -10, atol=1e-4)
        # the target tokens are the stored ones, so a student learns to predict exactly these
        if kind == "mcqa":
            assert len(rec["target_positions"]) == 1
    if kind == "mcqa":
        assert store.attrs["data"]["format"] == "mcqa"
        assert len(store.attrs["data"]["choice_token_ids"]) == 5


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, teacher_dir, data_files):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert cache(teacher_dir, data_files["pr"], out, "--chunk-positions", "64", "--batch-size", "3") == 0
    return out


@pytest.mark.parametrize("crash_at", ["planned", "unit-computed:0", "unit-rows:1", "before-complete"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, teacher_dir, data_files, reference_store, crash_at):
    out = tmp_path / "s.zarr"
    args = ["cache", "--teacher", teacher_dir, "--data", str(data_files["pr"]), "--out", str(out),
            "--chunk-positions", "64", "--batch-size", "3"]
    killed = run_cli(args, env={"FIRST_KD_CRASH_AT": crash_at})
    assert killed.returncode == -9, killed.stderr[-2000:]
    # a killed pass is never mistaken for a finished one: readers refuse it, saying how to resume
    assert main(["inspect", str(out)]) == 1
    with pytest.raises(FirstKDError, match="incomplete.*resume"):
        open_store(out)
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert open_store(out).attrs["complete"] is True
    assert_stores_equal(out, reference_store)


def test_two_processes_equal_one(tmp_path, teacher_dir, data_files, reference_store):
    out = tmp_path / "s.zarr"
    # On a CPU-only host accelerate's torchrun launcher is reached through --multi_gpu; first-kd asks
    # accelerate for CPU processes itself, so they talk over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "first_kd.cli",
           "cache", "--teacher", teacher_dir, "--data", str(data_files["pr"]), "--out", str(out),
           "--chunk-positions", "64", "--batch-size", "3"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, [l for l in result.stderr.splitlines() if "first-kd" in l or "Error" in l][:10]
    assert_stores_equal(out, reference_store)


def test_complete_store_not_overwritten_without_flag(tmp_path, teacher_dir, data_files, capsys):
    out = tmp_path / "s.zarr"
    assert cache(teacher_dir, data_files["mcqa"], out) == 0
    before = read_arrays(out)
    capsys.readouterr()
    assert cache(teacher_dir, data_files["pr"], out) == 2
    assert "--overwrite" in capsys.readouterr().err
    after = read_arrays(out)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    assert cache(teacher_dir, data_files["pr"], out, "--overwrite") == 0
    assert open_store(out).attrs["data"]["format"] == "prompt-response"


def test_unfinished_store_with_other_settings_is_refused(tmp_path, teacher_dir, data_files):
    out = tmp_path / "s.zarr"
    args = ["cache", "--teacher", teacher_dir, "--data", str(data_files["pr"]), "--out", str(out)]
    assert run_cli(args, env={"FIRST_KD_CRASH_AT": "planned"}).returncode == -9
    other = run_cli(args + ["--k", "3"])
    assert other.returncode == 2 and "other settings" in other.stderr and "k: 5 -> 3" in other.stderr


def test_yaml_config_with_flag_override(tmp_path, teacher_dir, data_files):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"cache:\n  teacher: {teacher_dir}\n  data: {data_files['pr']}\n  k: 3\n  batch_size: 2\n")
    out = tmp_path / "s.zarr"
    assert main(["cache", "--config", str(cfg), "--out", str(out), "k=4", "--k", "2"]) == 0
    assert open_store(out).k == 2


BAD_INPUTS = {
    "missing field": ([{"id": "a", "question": "q?", "answerKey": "A"}], "choices"),
    "answer not among choices": ([{"id": "a", "question": "q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]},
                                   "answerKey": "C"}], "answer"),
    "empty dataset": ([], "empty"),
    "prompt too long": ([{"id": "a", "prompt": " ".join(["cat"] * 400), "response": "dog"}], "max"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_error_and_no_store(tmp_path, teacher_dir, case):
    records, needle = BAD_INPUTS[case]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "s.zarr"
    result = run_cli(["cache", "--teacher", teacher_dir, "--data", str(data), "--out", str(out), "--max-length", "64"])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%" not in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0].lower()
    assert not out.exists()


def test_missing_teacher_is_one_line(tmp_path, data_files):
    result = run_cli(["cache", "--teacher", str(tmp_path / "nope"), "--data", str(data_files["pr"]),
                      "--out", str(tmp_path / "s.zarr")])
    assert result.returncode == 2 and "Traceback" not in result.stderr and "cannot load" in result.stderr


def test_real_csqa_layout_with_gpt2_tokenizer(tmp_path, shared_data):
    """CommonsenseQA dev in the HF layout through the real GPT-2 tokenizer and a tiny GPT-2-vocab teacher."""
    from transformers import GPT2TokenizerFast

    from first_kd.tiny import build_llama

    tok_dir = shared_data / "tokenizers" / "gpt2"
    tokenizer = GPT2TokenizerFast(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"))
    teacher = build_llama(tmp_path / "t", tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    out = tmp_path / "csqa.zarr"
    assert cache(str(teacher), shared_data / "csqa" / "dev_rand_split.jsonl", out, "--limit", "24") == 0
    store = open_store(out)
    assert len(store) == 24 and store.n_positions == 24
    assert store.attrs["data"]["choice_labels"][:5] == list("ABCDE")
    # uint16 ids for a 50,257-token vocabulary
    assert zarr.open_group(str(out))["topk_ids"].dtype == np.uint16


# ----------------------------------------------------------------------------------------------
# re-runs, rival passes, the teacher's identity, full disks and read-only directories


def test_same_command_on_a_complete_store_is_a_no_op(tmp_path, teacher_dir, data_files, capsys, monkeypatch):
    import first_kd.commands.cache as teacher_module

    out = tmp_path / "s.zarr"
    assert cache(teacher_dir, data_files["pr"], out, "--chunk-positions", "64") == 0
    before = read_arrays(out), (out / "zarr.json").read_bytes()
    capsys.readouterr()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded for a no-op")

    monkeypatch.setattr(teacher_module, "load_model", no_teacher)
    # batch size does not change the arrays, so it is not a setting that makes another pass
    assert cache(teacher_dir, data_files["pr"], out, "--chunk-positions", "64", "--batch-size", "2") == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err and "Traceback" not in err
    assert (out / "zarr.json").read_bytes() == before[1]
    # other settings on the finished store: refused, naming what differs and the way out
    assert cache(teacher_dir, data_files["pr"], out, "--chunk-positions", "64", "--k", "3") == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "k: 5 -> 3" in line and "--overwrite" in line
    after = read_arrays(out)
    for name in before[0]:
        np.testing.assert_array_equal(before[0][name], after[name])


def test_a_second_pass_on_the_same_out_is_refused_while_one_runs(tmp_path, teacher_dir, data_files, capsys):
    from first_kd.outputs import exclusive_lock

    out = tmp_path / "s.zarr"
    with exclusive_lock(out, "cache"):  # what a running `first-kd cache --out s.zarr` holds
        assert cache(teacher_dir, data_files["pr"], out) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "another `first-kd cache`" in line and str(out) in line
    assert not out.exists()


def _copy_teacher(src, dst, change=None, **save):
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    if change:
        with torch.no_grad():
            model.get_parameter(change).add_(0.01)
    for f in Path(dst).glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(dst, **save)
    return Path(dst)


def test_weights_fingerprint_sees_weights_not_files(tmp_path, teacher_dir):
    from first_kd.models import weights_fingerprint

    base = weights_fingerprint(teacher_dir)
    assert base and base["method"] == "safetensors-sampled-v1"
    sharded = _copy_teacher(teacher_dir, tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert weights_fingerprint(sharded)["sha256"] == base["sha256"]  # same weights in other shard files
    tuned = _copy_teacher(teacher_dir, tmp_path / "tuned", change="model.layers.1.mlp.down_proj.weight")
    assert weights_fingerprint(tuned)["sha256"] != base["sha256"]  # one matrix of a middle layer changed
    assert weights_fingerprint(str(tmp_path / "nothing-here")) is None


def test_calibrate_refuses_stores_of_other_weights_under_the_same_name(tmp_path, teacher_dir, data_files,
                                                                       monkeypatch, capsys):
    """Two stores cached from `--teacher teacher` in two directories holding different weights."""
    _copy_teacher(teacher_dir, tmp_path / "a" / "teacher")
    _copy_teacher(teacher_dir, tmp_path / "b" / "teacher", change="model.layers.0.self_attn.q_proj.weight")
    val_data = write_jsonl(tmp_path / "val.jsonl", mcqa_records(12, seed=7))
    monkeypatch.chdir(tmp_path / "a")
    assert cache("teacher", data_files["mcqa"], tmp_path / "train.zarr") == 0
    monkeypatch.chdir(tmp_path / "b")
    assert cache("teacher", val_data, tmp_path / "val_b.zarr") == 0
    capsys.readouterr()
    args = ["calibrate", "--store", str(tmp_path / "train.zarr")]
    assert main(args + ["--val-store", str(tmp_path / "val_b.zarr")]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "different weights" in line
    assert open_store(tmp_path / "train.zarr").temperature == {}
    # the same weights, reached by another path, are the same teacher
    monkeypatch.chdir(tmp_path)
    assert cache(str(tmp_path / "a" / "teacher"), val_data, tmp_path / "val_a.zarr") == 0
    assert main(args + ["--val-store", str(tmp_path / "val_a.zarr")]) == 0


def test_full_disk_is_one_line_naming_the_store_and_the_rerun_finishes(tmp_path, teacher_dir, data_files,
                                                                       reference_store):
    out = tmp_path / "s.zarr"
    args = ["cache", "--teacher", teacher_dir, "--data", str(data_files["pr"]), "--out", str(out),
            "--chunk-positions", "64", "--batch-size", "3"]
    assert run_cli(args, env={"FIRST_KD_CRASH_AT": "planned"}).returncode == -9
    # No file may grow past the planned store's metadata: marking the store complete at the latest fails.
    limit = (out / "zarr.json").stat().st_size + 1
    full = run_cli(args, limit_bytes=limit)
    lines = [line for line in full.stderr.splitlines() if line.startswith("first-kd")]
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert len(lines) == 1 and "EFBIG" in lines[0] and str(out) in lines[0]
    with pytest.raises(FirstKDError, match="incomplete"):  # nothing half-written looks complete
        open_store(out)
    assert not [p for p in out.rglob("*.partial")] and not list(tmp_path.glob(".*.tmp"))
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_stores_equal(out, reference_store)


def test_read_only_output_directory_is_one_line(tmp_path, teacher_dir, data_files):
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only_dir(parent):
        result = run_cli(["cache", "--teacher", teacher_dir, "--data", str(data_files["pr"]),
                          "--out", str(parent / "s.zarr")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(lines) == 1
    assert str(parent) in lines[0] and not (parent / "s.zarr").exists()
