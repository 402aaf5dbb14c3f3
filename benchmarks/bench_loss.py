"""Cost of a FIRST training step (chunked top-k KL on hidden states) vs a plain Hugging Face CE step.

Run (full config, a few minutes on 2 CPU cores; add --quick for a seconds-long smoke run):

    python benchmarks/bench_loss.py            # prints one JSON line, writes benchmarks/results/bench_loss.json

What is measured (same student, same batch, every position a target):
  * hf_ce:   ``model(input_ids, labels=input_ids).loss.backward()`` + AdamW step (the baseline).
  * first:   ``model.model(input_ids)`` hidden states -> `chunked_distillation_loss` against the cached
             teacher top-5 (FIRST prob-form temperature applied with first_kd.temperature) with
             ``model.lm_head.weight`` -> backward -> AdamW step. alpha = 0 and no other bucket, so the
             head is evaluated at the 5 teacher ids only.
  * dense:   the same with ``other_bucket=True, alpha=0.1, label_smoothing=0.1``: the loss needs the full
             vocabulary, so this is the chunked [chunk, V] path (the worst case for the chunked head).
  * first_lora: the `first` step on the same student with LoRA adapters (rank 16, every linear layer but
             the head; first_kd.adapters as `distill --lora-r 16`): only the adapters train.
  * online:  the `first` step preceded by the teacher's forward (Llama, 4 layers, hidden 512, same vocab,
             under inference_mode) and its top-5, i.e. distillation without the cache.
Config: student Llama 2 layers, hidden 256, vocab 32000; batch 4 x seq 512; fp32; AdamW.

Keys: time_ratio = first / hf_ce step time, memory_ratio = first / hf_ce peak step memory,
offline_speedup = online / first step time; *_dense the same for the dense variant; lora_time_ratio,
lora_memory_ratio = first_lora / first step time and transient memory, lora_state_ratio = first_lora /
first memory held between steps (weights + AdamW moments, counted from the tensors); absolute
seconds (every round's too), MB and tokens/s per variant, the config, device and torch version.

Timing: one process runs all four variants on the same model, interleaved round by round (2 warmup
rounds, then 7 timed rounds; CUDA: synchronised). Ratios are the median over rounds of the
within-round ratio, so a change in load on a shared machine hits both sides of a ratio alike and
the ratios stay meaningful even when absolute seconds do not (those are per-variant medians).
Memory, CPU: each variant runs in a fresh subprocess with glibc's mmap threshold pinned at 64 KiB
(MALLOC_MMAP_THRESHOLD_), so every tensor bigger than that is mmapped and its pages go back to the
OS when freed: RSS then tracks live tensors instead of malloc's cache. After setup and the warmup
steps (so weights, optimizer state and one-off buffers exist in both variants) the process resets
its peak RSS (writing 5 to /proc/self/clear_refs) and records its current RSS as the baseline; the
reported figure is VmHWM after two more steps minus that baseline, i.e. the transient memory of a
step (activations, logits, gradients). CUDA: max_memory_allocated above memory_allocated at the
same point, after torch.cuda.reset_peak_memory_stats().

Figures measured (full config, CPU, 2 cores shared with other jobs at load 3-5, torch 2.13.0+cpu;
this method's run is the one in benchmarks/results/bench_loss.json; in brackets the range over two
earlier runs that timed the variants the same way, or one after another in separate processes):
    time_ratio         0.33  [0.46 - 0.65]  (target <= 1.05)  first 0.28 s vs HF CE 1.22 s in one quiet round
    memory_ratio       0.205 [0.205]        (target <= 1.0)   177 MB vs 860 MB transient peak per step
    offline_speedup    3.0   [1.7 - 2.2]    (> 1)              the teacher forward + top-k outweigh the step
    time_ratio_dense   0.83  [0.92 - 0.94]  full-vocabulary chunked path (other bucket + CE mix + smoothing)
    memory_ratio_dense 0.456 [0.456]        393 MB vs 860 MB
    (Re-run with the first_lora variant, load ~2: time_ratio 0.255, memory_ratio 0.206, offline_speedup 4.3,
    dense 0.845 / 0.456: the same picture.)
    lora_time_ratio    0.746   LoRA r=16 `first` step 0.26 s vs 0.35 s for full fine-tuning
    lora_memory_ratio  0.656   116 MB vs 177 MB transient step memory (no weight gradients)
    lora_state_ratio   0.344   73 MB vs 212 MB held between steps (weights + AdamW moments); at this toy size
                               the frozen weights dominate; for an 8B student in bf16 it is ~16 GB + adapters
                               vs ~130 GB
Absolute seconds on that shared machine are 2-5x a quiet machine's; the ratios are what to compare.
CUDA was not measured (no GPU was available when this was written); the script runs it when present.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FULL = dict(batch=4, seq=512, vocab=32000, hidden=256, layers=2, teacher_hidden=512, teacher_layers=4,
            top_k=5, chunk_size=1024, warmup=2, steps=7, lora_r=16)
QUICK = dict(batch=2, seq=64, vocab=2000, hidden=64, layers=2, teacher_hidden=128, teacher_layers=2,
             top_k=5, chunk_size=64, warmup=1, steps=2, lora_r=8)
VARIANTS = ("hf_ce", "first", "dense", "first_lora", "online")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_loss.json"


def _llama(vocab, hidden, layers, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=4096,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _rss_mb():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) / 1024
    return fields


class _Bench:
    """Student, optimizer, batch and cached teacher top-K; `step(variant)` is one training step."""

    def __init__(self, cfg: dict, device: str, with_teacher: bool):
        import torch

        self.torch = torch
        self.dev = torch.device(device)
        B, T, V, K = cfg["batch"], cfg["seq"], cfg["vocab"], cfg["top_k"]
        self.cfg, self.shape = cfg, (B, T, V, K)
        self.model = _llama(V, cfg["hidden"], cfg["layers"], seed=0).to(self.dev).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        # The same student with LoRA adapters on every linear layer but the head (first_kd.adapters, as
        # `distill --lora-r`); only the adapters train.
        from first_kd.adapters import LoraOptions, add_lora

        lora = add_lora(_llama(V, cfg["hidden"], cfg["layers"], seed=0), LoraOptions(lora_r=cfg["lora_r"]), "bench")
        self.lora = lora.to(self.dev).train()
        self.lora_opt = torch.optim.AdamW([p for p in self.lora.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(0, V, (B, T), generator=gen).to(self.dev)
        self.targets = self.input_ids.reshape(-1)  # every position a target (the CE term of `dense`)
        self.teacher = None
        if with_teacher:
            self.teacher = _llama(V, cfg["teacher_hidden"], cfg["teacher_layers"], seed=2).to(self.dev).eval()
        # The cache's content: top-K ids and their log-probs per position (random but well-formed).
        lp, ids = torch.log_softmax(3 * torch.randn(B * T, V, generator=gen), -1).topk(K, dim=-1)
        self.cached_lp, self.cached_ids = lp.to(self.dev), ids.to(self.dev)

    def _teacher_topk(self, online: bool):
        if not online:
            return self.cached_ids, self.cached_lp
        B, T, V, K = self.shape
        with self.torch.inference_mode():
            logits = self.teacher(self.input_ids).logits.float()
            top_lp, top_ids = self.torch.log_softmax(logits, dim=-1).reshape(B * T, V).topk(K, dim=-1)
        return top_ids.clone(), top_lp.clone()  # out of inference mode, for the autograd graph

    def step(self, variant: str) -> None:
        from first_kd.losses import chunked_distillation_loss
        from first_kd.temperature import teacher_distribution

        model, opt, B, T = self.model, self.opt, self.shape[0], self.shape[1]
        if variant == "first_lora":
            model, opt, variant = self.lora.get_base_model(), self.lora_opt, "first"
        if variant == "hf_ce":
            loss = model(input_ids=self.input_ids, labels=self.input_ids).loss
        else:
            ids, lp = self._teacher_topk(online=variant == "online")
            dense = variant == "dense"
            probs = teacher_distribution(lp, form="prob", value=0.5, other_bucket=dense)
            hidden = model.model(input_ids=self.input_ids).last_hidden_state.reshape(B * T, -1)
            loss = chunked_distillation_loss(
                hidden, model.lm_head.weight, self.targets if dense else None, ids, probs,
                alpha=0.1 if dense else 0.0, other_bucket=dense, label_smoothing=0.1 if dense else 0.0,
                chunk_size=self.cfg["chunk_size"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def state_mb(self, variant: str) -> float:
        """Memory the run holds between steps: weights, plus AdamW's two moments of what trains."""
        model, opt = (self.lora, self.lora_opt) if variant == "first_lora" else (self.model, self.opt)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        moments = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if hasattr(t, "numel") and t.dim() > 0)
        return (weights + moments) / 2**20

    def sync(self) -> None:
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()


def time_variants(cfg: dict, device: str) -> dict:
    """Median step seconds per variant, the variants interleaved round by round in one process so a
    change in machine load (other jobs on a shared CPU) hits every variant alike."""
    bench = _Bench(cfg, device, with_teacher=True)
    for _ in range(cfg["warmup"]):
        for v in VARIANTS:
            bench.step(v)
    times = {v: [] for v in VARIANTS}
    for _ in range(cfg["steps"]):
        for v in VARIANTS:
            bench.sync()
            t0 = time.perf_counter()
            bench.step(v)
            bench.sync()
            times[v].append(time.perf_counter() - t0)
    return {v: {"step_s": statistics.median(t), "step_times_s": t} for v, t in times.items()}


def memory_worker(variant: str, cfg: dict, device: str) -> dict:
    """Transient peak memory (MB) of one variant's step, measured in this fresh process."""
    torch = __import__("torch")
    bench = _Bench(cfg, device, with_teacher=False)
    for _ in range(cfg["warmup"]):
        bench.step(variant)
    bench.sync()
    if bench.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_mb()["VmRSS"]
    for _ in range(2):
        bench.step(variant)
    bench.sync()
    if bench.dev.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = _rss_mb()["VmHWM"] - base
    return {"variant": variant, "peak_mb": peak_mb, "state_mb": bench.state_mb(variant)}


def run_memory(variant: str, cfg: dict, device: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", variant, "--device", device, "--config", json.dumps(cfg)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} on {device} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _round_ratio(res: dict, num: str, den: str) -> float:
    """Median over rounds of the within-round step-time ratio: load shifts between rounds cancel."""
    return statistics.median(a / b for a, b in zip(res[num]["step_times_s"], res[den]["step_times_s"]))


def summarise(res: dict, cfg: dict) -> dict:
    hf, first, dense, lora, online = (res[v] for v in VARIANTS)
    for r in res.values():
        r["tokens_per_s"] = cfg["batch"] * cfg["seq"] / r["step_s"]
    return {
        "time_ratio": _round_ratio(res, "first", "hf_ce"),
        "memory_ratio": first["peak_mb"] / hf["peak_mb"],
        "offline_speedup": _round_ratio(res, "online", "first"),
        "time_ratio_dense": _round_ratio(res, "dense", "hf_ce"),
        "memory_ratio_dense": dense["peak_mb"] / hf["peak_mb"],
        # LoRA vs full fine-tuning, both the `first` step: step time, transient step memory, and the memory
        # held between steps (weights + AdamW state), where LoRA's saving is.
        "lora_time_ratio": _round_ratio(res, "first_lora", "first"),
        "lora_memory_ratio": lora["peak_mb"] / first["peak_mb"],
        "lora_state_ratio": lora["state_mb"] / first["state_mb"],
        "state_mb": {v: round(res[v]["state_mb"], 1) for v in VARIANTS if v != "online"},
        "time_ratio_of_medians": first["step_s"] / hf["step_s"],
        "step_s": {v: round(res[v]["step_s"], 4) for v in VARIANTS},
        "step_times_s": {v: [round(t, 4) for t in res[v]["step_times_s"]] for v in VARIANTS},
        "peak_mb": {v: round(res[v]["peak_mb"], 1) for v in VARIANTS if v != "online"},
        "tokens_per_s": {v: round(res[v]["tokens_per_s"], 1) for v in VARIANTS},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke config (seconds)")
    parser.add_argument("--out", default=str(RESULTS), help="where to save the JSON line")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(args.worker, json.loads(args.config), args.device)))
        return 0

    import torch
    from tqdm import tqdm

    cfg = QUICK if args.quick else FULL
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    per_device = {}
    with tqdm(total=len(devices) * len(VARIANTS), desc="bench_loss", file=sys.stderr) as bar:
        for device in devices:
            bar.set_postfix_str(f"{device}/timing")
            res = time_variants(cfg, device)
            bar.update()
            for v in VARIANTS[:-1]:  # the online step's memory is not a target
                bar.set_postfix_str(f"{device}/memory {v}")
                res[v].update(run_memory(v, cfg, device))
                bar.update()
            per_device[device] = summarise(res, cfg)
    result = dict(per_device["cpu"])  # the headline figures are CPU's
    result["rounded"] = {k: round(result[k], 3) for k in
                         ("time_ratio", "memory_ratio", "offline_speedup", "time_ratio_dense", "memory_ratio_dense",
                          "lora_time_ratio", "lora_memory_ratio", "lora_state_ratio")}
    if "cuda" in per_device:
        result["cuda"] = per_device["cuda"]
        result["cuda_device"] = torch.cuda.get_device_name(0)
    result.update(config=cfg, quick=args.quick, device="cpu", cpu_threads=torch.get_num_threads(),
                  torch=torch.__version__,
                  targets={"time_ratio": "<= 1.05", "memory_ratio": "<= 1.0", "offline_speedup": "> 1"})
    line = json.dumps(result)
    print(line)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
