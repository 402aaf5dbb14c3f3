"""What the teacher pass costs: store bytes per target position, the fp16 error, and time vs a plain forward.

Run (full config: about 8 minutes on a quiet 2-core CPU, 15-20 on a shared one; --quick: ~15 s smoke run):

    python benchmarks/bench_cache.py            # one JSON line, also written to benchmarks/results/bench_cache.json
    python benchmarks/bench_cache.py --quick    # writes benchmarks/results/bench_cache.quick.json instead

Needs ../shared/data (ARC-Easy, CommonsenseQA, the GPT-2 tokenizer); nothing is downloaded.

1. Store size and precision, on a teacher that has learned something (a random model's near-uniform
   logits would say nothing about how well its top-k compresses): a Llama (hidden 128, 2 layers,
   vocab 50,257, the real GPT-2 tokenizer) trained for a few minutes with AdamW on next-token
   prediction over ARC-Easy train (rendered in the Alpaca prompt the cache uses) and CommonsenseQA
   question + answer text. Then `first-kd cache` (through first_kd.cli.main, k=5) on held-out data:
     * `arc`:  ARC-Easy test as prompt-response records, exactly what the brief asks for. Its targets
               ("the correct answer is answerN" + eos) are formulaic, so they compress very well.
     * `text`: the same held-out questions as the *response* (prompt "### Instruction:\\n"), so most
               positions predict free text: flatter, more varied distributions, the harder case.
   Keys: bytes_per_position (topk_ids + topk_logprobs on disk, metadata included, per target position),
   bytes_per_position_total (the whole store: inputs and offsets too), max_prob_error = max over every
   stored entry of |exp(stored fp16 log-prob) - exp(fp32 log-prob of the same id from the model)|, the
   fp32 values recomputed by a separate unpadded full forward per sequence.
2. Pass time (Llama 4 layers, hidden 512, intermediate 2048, vocab 32,000, random init; batch 4 x
   seq 512; fp32): `first_kd.engines.hf.topk_at_positions` with every position a target vs
   `model(input_ids).logits`, both under inference_mode, interleaved round by round on the same
   batch (warmup, then the median of the timed rounds), so load changes hit both alike.
   overhead_ratio = topk / plain. Then the whole `first-kd cache` command (load, tokenize, plan,
   teacher loop, store writes, verify) on records of exactly 512 tokens with batch size 4, per token,
   against the plain forward per token: cache_overhead_ratio; the loop's own share is split into
   teacher seconds (topk_at_positions) and store-write seconds (store.write_unit), timed by wrapping both.

Targets: bytes_per_position <= 16, max_prob_error <= 1e-3, overhead_ratio <= 1.15.
The machine is shared: os.getloadavg() at start and end is in the output; report figures from a
low-load run.

Figures measured (full config, CPU, 2 cores shared with other jobs at load 2-3, torch 2.13.0+cpu; the
run in benchmarks/results/bench_cache.json; in brackets the range over 4 runs of the timing half):
    bytes_per_position   arc 6.90 (ids 1.04 + log-probs 5.85; 18.5 with inputs)   text 8.86 (9.9 with inputs)
                         raw payload 20 bytes (5 x uint16 + 5 x fp16)              (target <= 16)
    max_prob_error       1.8e-4 on both (fp16 log-prob rounding; log-prob error 3.9e-3 at log-probs
                         below -8, where it moves a probability by < 2e-6)        (target <= 1e-3)
                         stored top-1 ids and top-5 sets equal the exact ones at 100% of positions
    mean top-5 mass      arc 0.993, text 0.685 (p10 0.13); teacher loss 10.86 -> 2.61 in 250 steps
    overhead_ratio       1.061 [1.06 - 1.10]  topk 3.10 s vs plain 2.92 s per 4 x 512 batch under load;
                         1.00 s vs 0.94 s on a quiet machine                      (target <= 1.15)
                         Re-run after the head was normalised in place (top-k on the raw logits, the
                         row's logsumexp from the top-1 and an in-place exp-sum; issue 16), three runs
                         of `--only time` (results/bench_cache.time-runs.json; plain forward 1.05 /
                         1.07 / 1.15 s): overhead_ratio 1.066 / 1.050 / 1.159, cache_overhead_ratio
                         1.078 / 1.024 / 1.067 (the third run had another job starting; target <= 1.05).
                         Three more runs on 2026-12-01 at load 1.6-1.8 (plain forward 1.18 / 1.16 / 1.27 s;
                         single plain rounds ranged 0.96-2.48 s): overhead_ratio 1.052 / 1.144 / 1.145,
                         cache_overhead_ratio 1.257 / 1.343 / 1.179. In the same hour an interleaved
                         in-process A/B (plain forward vs topk_at_positions, same model and batch, 6 rounds
                         each) gave topk / plain = 0.95-0.98 in one run and 1.27 in another: on this shared
                         machine the spread between runs is larger than the 5% the target asks to resolve.
                         An interleaved A/B in one process against the old log_softmax head on the same
                         model and batch (load 1.7-3) gave old 1.05-1.12 vs new 1.05-1.18: on this 2-core
                         shared CPU the difference is below the noise; tiling the vocabulary (online
                         softmax over 2k-8k-id tiles) was slower (1.08-1.47) and was dropped.
    cache_overhead_ratio 1.022 [1.02 - 1.13]  whole command, 16,384 tokens in 24.1 s: teacher 23.8 s,
                         store writes 0.013 s, load + tokenize + plan + verify 0.25 s
Store figures are identical run to run (fixed seeds and step count); the timing ratios move by a few
per cent with the load. The store's codec was kept: of the alternatives re-encoded in
`encoding_alternatives`, only zstd level 9 (-0.5 bytes/position) and 65,536-row chunks (-0.25) were
smaller, neither needed for the target; bitshuffle and a rank-major TransposeCodec were larger.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"

FULL = dict(
    # 1. the trained teacher and the held-out stores
    hidden=128, layers=2, heads=4, train_steps=250, train_batch=8, train_seq=128, lr=3e-3, warmup_steps=10,
    arc_limit=None, text_limit=600, cache_batch=16, k=5,
    # 2. timing
    t_hidden=512, t_layers=4, t_heads=8, t_vocab=32000, t_batch=4, t_seq=512, t_warmup=2, t_rounds=7,
    t_after_rounds=3, t_sequences=32,
)
QUICK = dict(
    hidden=32, layers=1, heads=2, train_steps=4, train_batch=4, train_seq=64, lr=3e-3, warmup_steps=1,
    arc_limit=40, text_limit=20, cache_batch=8, k=5,
    t_hidden=64, t_layers=2, t_heads=2, t_vocab=2000, t_batch=2, t_seq=64, t_warmup=1, t_rounds=2,
    t_after_rounds=1, t_sequences=4,
)
TARGETS = {"bytes_per_position": 16.0, "max_prob_error": 1e-3, "overhead_ratio": 1.15}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"  # the cache's template without {input}


def _load(name):
    with open(DATA / name) as f:
        return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f if line.strip()]


def _gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    tok_dir = DATA / "tokenizers" / "gpt2"
    # transformers 5 names: vocab= / merges= (the old vocab_file= silently gives an empty tokenizer)
    return GPT2TokenizerFast(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"))


def _training_texts() -> list[str]:
    """ARC-Easy train in the prompt the cache renders (so the teacher knows the format it is asked
    about) and CommonsenseQA questions with their answer text. No ARC-Easy test text."""
    texts = [ALPACA_PROMPT.format(instruction=r["instruction"]) + r["output"] for r in _load("arc_easy/train.json")]
    for r in _load("csqa/dev_rand_split.jsonl"):
        answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
        texts.append(f"Question: {r['question']}\nAnswer: {answer}")
    return texts


def train_teacher(out_dir: Path, cfg: dict, progress) -> dict:
    """Build a GPT-2-vocabulary Llama, train it on next-token prediction, save it with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from first_kd.tiny import build_llama

    tokenizer = _gpt2_tokenizer()
    build_llama(out_dir, tokenizer, hidden_size=cfg["hidden"], num_layers=cfg["layers"], num_heads=cfg["heads"],
                max_position_embeddings=512, seed=0)
    model = AutoModelForCausalLM.from_pretrained(out_dir).train()

    eos = tokenizer.eos_token_id
    stream = [t for text in _training_texts() for t in tokenizer.encode(text) + [eos]]
    T = cfg["train_seq"]
    blocks = torch.tensor(stream[: len(stream) // T * T]).view(-1, T)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    steps, warm = cfg["train_steps"], cfg["warmup_steps"]
    # linear warmup, then cosine down to a tenth: a short run still ends on a settled model
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(0)
    losses, started = [], time.perf_counter()
    torch.manual_seed(0)
    bar = progress(total=steps, desc="train teacher", leave=False)
    for _ in range(steps):
        batch = blocks[torch.randint(0, len(blocks), (cfg["train_batch"],), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.save_pretrained(out_dir)
    tail = losses[-min(10, len(losses)):]
    return {"train_s": round(time.perf_counter() - started, 1), "train_tokens": steps * cfg["train_batch"] * T,
            "corpus_tokens": len(stream), "loss_first": round(losses[0], 3), "loss_last10": round(sum(tail) / len(tail), 3)}


def run_cache_cli(args: list[str]) -> tuple[float, str]:
    """`first-kd cache ARGS` in this process (its bars and notes captured); returns (seconds, output)."""
    from first_kd.cli import main

    buf = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(["cache", *args])
    seconds = time.perf_counter() - started
    if rc != 0:
        raise RuntimeError(f"first-kd cache {' '.join(args)} exited {rc}:\n{buf.getvalue()[-3000:]}")
    return seconds, buf.getvalue()


def encoding_alternatives(store_path: Path) -> dict:
    """Top-k chunk bytes per position (metadata excluded) if the same arrays were encoded otherwise
    (in memory, crc32c kept), so the store's codec choice is re-checked on every run."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec
    from zarr.storage import MemoryStore

    group = zarr.open_group(str(store_path), mode="r")
    n = group.attrs["counts"]["n_positions"]
    arrays = [group[name][:n] for name in ("topk_ids", "topk_logprobs")]
    rows = group.attrs["chunk_positions"]

    def blosc(shuffle, level=5):
        return (BloscCodec(cname="zstd", clevel=level, shuffle=shuffle), Crc32cCodec())

    by_rank = (TransposeCodec(order=(1, 0)),)  # each rank's column contiguous within a chunk
    variants = {
        "zstd5_shuffle (store)": dict(compressors=blosc("shuffle")),
        "zstd5_bitshuffle": dict(compressors=blosc("bitshuffle")),
        "zstd9_shuffle": dict(compressors=blosc("shuffle", 9)),
        "transpose_zstd5_shuffle": dict(filters=by_rank, compressors=blosc("shuffle")),
        "transpose_zstd5_bitshuffle": dict(filters=by_rank, compressors=blosc("bitshuffle")),
        "transpose_zstd22": dict(filters=by_rank, compressors=(ZstdCodec(level=22), Crc32cCodec())),
        "zstd5_shuffle_rows65536": dict(compressors=blosc("shuffle"), chunk_rows=1 << 16),
    }
    out = {}
    for name, kw in variants.items():
        kw = dict(kw)
        chunk_rows = kw.pop("chunk_rows", rows)
        total = 0
        for a in arrays:
            chunks = {}
            z = zarr.create_array(MemoryStore(chunks), shape=a.shape, chunks=(chunk_rows, a.shape[1]), dtype=a.dtype,
                                  fill_value=0, **kw)
            z[:] = a
            total += sum(len(v.to_bytes()) for key, v in chunks.items() if not key.endswith("zarr.json"))
        out[name] = round(total / n, 3)
    return out


def store_figures(store_path: Path, teacher_dir: Path, progress) -> dict:
    """Bytes per position (from store.verify) and the stored-vs-exact probability error over every entry."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from first_kd.store import bytes_on_disk, open_store, verify

    summary = verify(store_path)
    store = open_store(store_path)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    max_prob_err = max_lp_err = 0.0
    top1_same = set_same = 0
    bar = progress(total=len(store), desc=f"check {store_path.name}", leave=False)
    with torch.inference_mode():
        for i in range(len(store)):
            rec = store.get(i, temperature=False)
            logits = model(torch.from_numpy(rec["input_ids"])[None]).logits[0].float()
            exact = torch.log_softmax(logits[torch.from_numpy(rec["target_positions"])], dim=-1)
            ids = torch.from_numpy(rec["topk_ids"])
            exact_at_ids = exact.gather(1, ids).numpy()  # the same ids, so tie order cannot fake an error
            stored = rec["topk_logprobs"]
            max_prob_err = max(max_prob_err, float(np.abs(np.exp(stored) - np.exp(exact_at_ids)).max()))
            max_lp_err = max(max_lp_err, float(np.abs(stored - exact_at_ids).max()))
            exact_ids = exact.topk(store.k, dim=-1).indices
            top1_same += int((exact_ids[:, 0] == ids[:, 0]).sum())
            set_same += int((exact_ids.sort(-1).values == ids.sort(-1).values).all(-1).sum())
            bar.update()
    bar.close()
    n = summary["n_positions"]
    id_bytes = np.dtype(store.group["topk_ids"].dtype).itemsize
    return {
        "bytes_per_position": round(summary["bytes_per_position"], 3),
        "bytes_per_position_total": round(summary["bytes_per_position_total"], 3),
        "bytes_per_position_ids": round(bytes_on_disk(store_path, "topk_ids") / n, 3),
        "bytes_per_position_logprobs": round(bytes_on_disk(store_path, "topk_logprobs") / n, 3),
        "raw_bytes_per_position": store.k * (id_bytes + 2),  # uncompressed ids + fp16
        "max_prob_error": max_prob_err,
        "max_logprob_error": max_lp_err,
        "top1_id_agreement": top1_same / n,
        "topk_set_agreement": set_same / n,
        "mean_topk_mass": round(summary["mean_topk_mass"], 4),
        "topk_mass_p10": round(summary["topk_mass_p10"], 4),
        "n_sequences": summary["n_sequences"],
        "n_tokens": summary["n_tokens"],
        "n_positions": n,
        "encoding_alternatives": encoding_alternatives(store_path),
    }


def bench_store(work: Path, cfg: dict, progress) -> dict:
    teacher = work / "teacher"
    training = train_teacher(teacher, cfg, progress)

    arc_args = ["--data", str(DATA / "arc_easy" / "test.json")]
    if cfg["arc_limit"]:
        arc_args += ["--limit", str(cfg["arc_limit"])]
    text_data = work / "arc_test_text.jsonl"
    with open(text_data, "w") as f:
        for i, r in enumerate(_load("arc_easy/test.json")[: cfg["text_limit"]]):
            response = ALPACA_PROMPT.format(instruction=r["instruction"]).split("\n", 1)[1] + r["output"]
            f.write(json.dumps({"id": f"arc-test-{i}", "prompt": "### Instruction:\n", "response": response}) + "\n")
    result = {"teacher_training": training}
    for name, data_args in (("arc", arc_args), ("text", ["--data", str(text_data)])):
        out = work / f"{name}.zarr"
        seconds, _ = run_cache_cli(["--teacher", str(teacher), *data_args, "--out", str(out), "--k", str(cfg["k"]),
                                    "--batch-size", str(cfg["cache_batch"])])
        figures = store_figures(out, teacher, progress)
        figures["cache_s"] = round(seconds, 2)
        result[name] = figures
    return result


# ----------------------------------------------------------------------------------------------
# 2. Time


def _timing_teacher(work: Path, cfg: dict) -> tuple[Path, Path]:
    """A random Llama of the timing config saved with a BPE tokenizer trained here, and records of
    exactly t_seq tokens (a short prompt, the rest response: nearly every position a target)."""
    from first_kd.tiny import build_llama, train_tokenizer

    texts = [r["instruction"] for r in _load("arc_easy/test.json")]
    tokenizer = train_tokenizer(texts, vocab_size=min(8000, cfg["t_vocab"]))
    model_dir = build_llama(work / "timing_teacher", tokenizer, hidden_size=cfg["t_hidden"], num_layers=cfg["t_layers"],
                            num_heads=cfg["t_heads"], max_position_embeddings=cfg["t_seq"], vocab_size=cfg["t_vocab"])
    stream = tokenizer.encode("\n\n".join(texts), add_special_tokens=False)
    prompt = "Text:"
    room = cfg["t_seq"] - len(tokenizer.encode(prompt))
    path = work / "timing.jsonl"
    with open(path, "w") as f:
        for i in range(cfg["t_sequences"]):
            piece = stream[i * room: (i + 1) * room + 16]  # a little extra: --max-length cuts it exactly
            f.write(json.dumps({"id": f"t{i}", "prompt": prompt, "response": tokenizer.decode(piece)}) + "\n")
    return model_dir, path


def _timed(fn):
    """`fn` that adds up the seconds spent in it in `.seconds` (and keeps the original in `.original`)."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            wrapper.seconds += time.perf_counter() - started
    wrapper.seconds, wrapper.original = 0.0, fn
    return wrapper


def bench_time(work: Path, cfg: dict, progress) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import first_kd.engines.hf as teacher_mod
    import first_kd.store as store_mod

    model_dir, data = _timing_teacher(work, cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    B, S = cfg["t_batch"], cfg["t_seq"]
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, cfg["t_vocab"], (B, S), generator=gen)
    mask = torch.ones_like(input_ids)
    rows = torch.arange(B).repeat_interleave(S)  # every position a target
    cols = torch.arange(S).repeat(B)

    def plain():
        return model(input_ids=input_ids).logits

    def topk():
        return teacher_mod.topk_at_positions(model, input_ids, mask, rows, cols, cfg["k"])

    variants = {"plain": plain, "topk": topk}
    times = {v: [] for v in variants}
    rounds = cfg["t_warmup"] + cfg["t_rounds"]
    bar = progress(total=rounds + 1 + cfg["t_after_rounds"], desc="timing", leave=False)
    with torch.inference_mode():
        for r in range(rounds):
            for name, fn in variants.items():
                started = time.perf_counter()
                fn()
                if r >= cfg["t_warmup"]:
                    times[name].append(time.perf_counter() - started)
            bar.update()

    # The whole command, with its teacher calls and store writes timed from inside.
    teacher_fn, write_fn = _timed(teacher_mod.topk_at_positions), _timed(store_mod.write_unit)
    teacher_mod.topk_at_positions, store_mod.write_unit = teacher_fn, write_fn
    try:
        out = work / "timing.zarr"
        cache_s, _ = run_cache_cli(["--teacher", str(model_dir), "--data", str(data), "--out", str(out),
                                    "--k", str(cfg["k"]), "--batch-size", str(B), "--max-length", str(S)])
    finally:
        teacher_mod.topk_at_positions, store_mod.write_unit = teacher_fn.original, write_fn.original
    bar.update()
    counts = store_mod.open_store(out).attrs["counts"]

    after = []
    with torch.inference_mode():
        for _ in range(cfg["t_after_rounds"]):
            started = time.perf_counter()
            plain()
            after.append(time.perf_counter() - started)
            bar.update()
    bar.close()

    plain_s, topk_s = statistics.median(times["plain"]), statistics.median(times["topk"])
    plain_per_token = statistics.median(times["plain"] + after) / (B * S)  # before and after the command
    n_tok = counts["n_tokens"]
    return {
        "overhead_ratio": topk_s / plain_s,
        "cache_overhead_ratio": cache_s / n_tok / plain_per_token,
        "cache_loop_overhead_ratio": (teacher_fn.seconds + write_fn.seconds) / n_tok / plain_per_token,
        "plain_forward_s": round(plain_s, 4),
        "topk_at_positions_s": round(topk_s, 4),
        "round_times_s": {v: [round(t, 4) for t in ts] for v, ts in times.items()},
        "plain_forward_after_s": [round(t, 4) for t in after],
        "plain_tokens_per_s": round(B * S / plain_s, 1),
        "topk_tokens_per_s": round(B * S / topk_s, 1),
        "cache": {"total_s": round(cache_s, 2), "teacher_s": round(teacher_fn.seconds, 2),
                  "store_write_s": round(write_fn.seconds, 3),
                  "other_s": round(cache_s - teacher_fn.seconds - write_fn.seconds, 2),
                  "tokens_per_s": round(n_tok / cache_s, 1), "n_tokens": n_tok, "n_positions": counts["n_positions"],
                  "n_sequences": counts["n_sequences"]},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke config (well under a minute)")
    parser.add_argument("--out", help="where to save the JSON line (default benchmarks/results/bench_cache[.quick].json)")
    parser.add_argument("--only", choices=("store", "time"), help="run one half only")
    args = parser.parse_args(argv)
    if not (DATA / "arc_easy" / "test.json").is_file():
        print(f"bench_cache: error: {DATA} is missing: this benchmark needs the shared data (ARC-Easy, "
              "CommonsenseQA, GPT-2 tokenizer) beside the project", file=sys.stderr)
        return 2

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import functools

    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    real_stderr = sys.stderr
    progress = functools.partial(tqdm, file=real_stderr, dynamic_ncols=True)

    cfg = QUICK if args.quick else FULL
    load_start = os.getloadavg()
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        work = Path(tmp)
        if args.only != "time":
            stores = bench_store(work, cfg, progress)
            result.update(bytes_per_position=stores["arc"]["bytes_per_position"],
                          max_prob_error=max(stores["arc"]["max_prob_error"], stores["text"]["max_prob_error"]),
                          stores=stores)
        if args.only != "store":
            timing = bench_time(work, cfg, progress)
            result.update(overhead_ratio=timing["overhead_ratio"], cache_overhead_ratio=timing["cache_overhead_ratio"],
                          timing=timing)
    met = {key: result[key] <= limit for key, limit in TARGETS.items() if key in result}
    if "stores" in result:
        met["bytes_per_position_text"] = result["stores"]["text"]["bytes_per_position"] <= TARGETS["bytes_per_position"]
    result.update(
        rounded={k: round(result[k], 4 if k != "max_prob_error" else 7) for k in
                 ("bytes_per_position", "max_prob_error", "overhead_ratio", "cache_overhead_ratio") if k in result},
        targets={"bytes_per_position": "<= 16", "max_prob_error": "<= 1e-3", "overhead_ratio": "<= 1.15"},
        targets_met=met, config=cfg, quick=args.quick, device="cpu", cpu_threads=torch.get_num_threads(),
        torch=torch.__version__, loadavg_start=[round(x, 2) for x in load_start],
        loadavg_end=[round(x, 2) for x in os.getloadavg()],
    )
    line = json.dumps(result)
    print(line)
    out = Path(args.out) if args.out else RESULTS / ("bench_cache.quick.json" if args.quick else "bench_cache.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
