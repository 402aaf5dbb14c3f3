"""Data-parallel distillation: 2 CPU processes x batch b take the same steps as 1 process x batch 2b."""

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from first_kd.cli import main
from first_kd.tiny import build_llama

from helpers import mcqa_records, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, tiny_tokenizer):
    teacher = build_llama(tmp_path / "teacher", tiny_tokenizer, hidden_size=64, num_layers=2, seed=1)
    student = build_llama(tmp_path / "student", tiny_tokenizer, hidden_size=32, num_layers=1, seed=2)
    data = write_jsonl(tmp_path / "mc.jsonl", mcqa_records(64))
    store = tmp_path / "train.zarr"
    assert main(["cache", "--teacher", str(teacher), "--data", str(data), "--out", str(store)]) == 0
    common = ["distill", "--student", str(student), "--store", str(store), "--loss", "kd", "--max-steps", "6",
              "--lr", "3e-3", "--seed", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "first_kd.cli"]
    two = subprocess.run(launch + common + ["--batch-size", "4", "--out", str(tmp_path / "two")], cwd=REPO,
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, [line for line in two.stderr.splitlines() if "first-kd" in line or "Error" in line]
    assert main(common + ["--batch-size", "8", "--out", str(tmp_path / "one")]) == 0

    a = load_file(tmp_path / "two" / "model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "model.safetensors")
    start = load_file(student / "model.safetensors")
    moved = max((b[k] - start[k]).abs().max().item() for k in b)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the runs trained
    assert diff < 1e-4 * max(moved, 1.0), (diff, moved)
