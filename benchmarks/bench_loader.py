"""What reading a store for training costs: target positions/s of the training data loader, and its memory.

Run (the full config: about 6 minutes on the shared 2-core CPU; --quick: a 1.5-minute smoke run):

    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py          # one JSON line, also benchmarks/results/bench_loader.json
    OMP_NUM_THREADS=1 python benchmarks/bench_loader.py --quick  # benchmarks/results/bench_loader.quick.json

Synthetic stores (first_kd.tiny.synthetic_store: first_kd.store's own create_store / write_unit /
mark_complete, no teacher) of 1M and 10M target positions: k = 5, 128 targets and 32 prompt tokens per
sequence, vocabulary 32,000, the cache's default 16,384-row chunks; written to a temp dir, removed after.

Each case reads the store through first_kd.loader exactly as `first-kd distill` does (StoreExamples with a
calibrated-style TeacherTargets, StepBatches of 32 sequences = 4,096 positions per step, step_loader),
in a fresh process, for a fixed time, and reports:
  * positions_per_s: target positions per second after the first batch (steady state), and
    first_batch_s (start-up: worker processes, the first chunks);
  * peak_rss_mb: the reading process's peak RSS, and with workers the largest worker's (ru_maxrss of the
    process and of its reaped children). It must stay flat as the store grows.
Orders: sequential (store order: the ceiling), local (the default: chunks shuffled, then sequences within
windows of 8 chunks), random (a full permutation, a chunk decode per sequence); 0 and 2 workers.
`old_per_example` is the reader this loader replaced, for reference: a full permutation read example by
example on the calling thread, each example running its own teacher softmax, at 1 and 2 torch threads.

Target (issue 12): at 10M positions the shuffled order the loader trains with (local) within 2x of
sequential, and flat RSS from 1M to 10M.

Figures measured (full config, OMP_NUM_THREADS=1, CPU, 2 cores shared with another developer's jobs,
loadavg 2.4-2.8, torch 2.13.0+cpu; the run in benchmarks/results/bench_loader.json; target positions/s,
best of 2 rounds, the other round in brackets):
                            1M positions              10M positions
    sequential, 0 workers   1,395,194 [1,231,853]     1,624,728 [1,173,477]
    local,      0 workers   1,750,474 [1,578,106]     1,508,919 [1,250,599]   0.93 x sequential
    random,     0 workers      92,451 [81,288]           44,237 [36,009]      0.027 x sequential
    sequential, 2 workers     574,184 [562,765]         658,193 [520,838]
    local,      2 workers     573,994 [476,847]         646,700 [404,617]     0.98 x sequential
    random,     2 workers     124,643 [123,477]          76,209 [39,234]      0.12 x sequential
    old per example, 1 thr     81,880 [73,644]           41,816 [34,115]      (327 sequences/s)
    old per example, 2 thr     46,345 [34,149]           38,612 [34,420]      (302 sequences/s)
    peak RSS, reading process  263-266 MB                280-288 MB  (+16 to +20 MB)
              main with 2 workers 237 MB / workers 205-208 MB   239-241 MB / 218-225 MB
Both targets met. The RSS difference is the chunk cache filling up, not the store: the loader keeps up to
18 decoded chunks per array (about 20 MB at these dtypes), and the 1M store's input_ids and
target_positions arrays have only 5 and 4 chunks; with every array past 18 chunks, peak RSS no longer
depends on the store's size (the open store itself: +3 MB from 1M to 10M, its offsets). Random order
decodes two to four chunks per sequence (6,815 decodes for ~2,000 sequences at 10M), hence 0.03x. Two
workers read more slowly than the training thread here: on 2 shared cores the three processes compete,
and each step's tensors cross to the main process through shared memory; on a GPU machine they keep
the training thread free (5,000 sequences/s, far above a real student's step rate), which is why
`distill` defaults to 2 workers on a GPU and 0 on CPU. The old reader's two-thread collapse (22
sequences/s in the issue) is load-dependent: 17 sequences/s in one --quick run here, 302 in this one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

FULL = dict(sizes=[1_000_000, 10_000_000], rounds=2, seconds=6.0, batch=32, targets=128, prompt=32, vocab=32000, k=5,
            chunk_positions=16384, window=8)
QUICK = dict(sizes=[100_000, 400_000], rounds=1, seconds=1.5, batch=32, targets=128, prompt=32, vocab=32000, k=5,
             chunk_positions=16384, window=8)
CASES = [("sequential", 0), ("local", 0), ("random", 0), ("sequential", 2), ("local", 2), ("random", 2),
         ("old_per_example", 1), ("old_per_example", 2)]  # (order, workers; torch threads for the old reader)
TARGET_RATIO = 0.5  # local throughput / sequential throughput, at the largest store
# Peak RSS at the largest store minus at the smallest, MB, per case (main process and worker). The top-k
# payload alone is 20 bytes a position (200 MB at 10M): a reader holding the store would be far above this.
TARGET_RSS_GROWTH_MB = 32


def _label(n: int) -> str:
    return f"{n / 1e6:g}M"


def _status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: that survives exec, so a case process
    would report the peak of the benchmark process that started it."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024  # kB


def _workers_peak_rss_mb() -> float:
    """The largest peak RSS of this process's reaped children (DataLoader workers are forked, not exec'd)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# One case, in its own process


def read_case(store: str, order: str, workers: int, cfg: dict) -> dict:
    """Read `store` through the loader (or the old per-example reader) for cfg['seconds']."""
    import torch

    from first_kd.loader import StepBatches, StepPlan, epoch_permutation, step_loader
    from first_kd.store import open_store
    from first_kd.training import StoreExamples, TeacherTargets

    targets = TeacherTargets({"form": "prob", "value": 0.5})  # what a calibrated `first` run computes
    examples = StoreExamples(open_store(store), targets)
    rss_open = _status_mb("VmRSS")  # imports and the open store: what the process holds before reading
    started = time.perf_counter()
    positions, steps, first_batch_s, since_first = 0, 0, None, None
    if order == "old_per_example":
        torch.set_num_threads(workers)  # the old reader at 1 and 2 torch threads
        perm = epoch_permutation(len(examples), 0, 0)
        for i in perm:
            rec = examples.store.get(int(i), temperature=False)
            targets(torch.from_numpy(rec["topk_logprobs"]))
            positions += len(rec["target_positions"])
            steps += 1
            if first_batch_s is None and steps == cfg["batch"]:
                first_batch_s, since_first, positions = time.perf_counter() - started, time.perf_counter(), 0
            if since_first is not None and time.perf_counter() - since_first > cfg["seconds"]:
                break
        steps //= cfg["batch"]
    else:
        n = len(examples)
        epochs = 100  # more than any case reads in its time: it stops on the clock, not at an epoch's end
        plan = StepPlan(n, 0, cfg["batch"], cfg["batch"], epochs * -(-n // cfg["batch"]), order, cfg["window"])
        loader = iter(step_loader(StepBatches(examples, plan, 0, True), 0, workers))
        for micro in loader:
            steps += 1
            if first_batch_s is None:
                first_batch_s, since_first = time.perf_counter() - started, time.perf_counter()
                continue
            positions += sum(len(b["targets"]) for b in micro)
            if time.perf_counter() - since_first > cfg["seconds"]:
                break
        del loader  # the workers exit and are reaped, so their peak RSS is counted below
    elapsed = time.perf_counter() - since_first
    return {"positions_per_s": round(positions / elapsed), "sequences_per_s": round(positions / elapsed / cfg["targets"], 1),
            "first_batch_s": round(first_batch_s, 3), "steps": steps, "seconds": round(elapsed, 2),
            "chunk_decodes_main": examples.store.chunk_decodes,
            "rss_after_open_mb": round(rss_open, 1), "peak_rss_mb": round(_status_mb("VmHWM"), 1),
            "peak_rss_worker_mb": round(_workers_peak_rss_mb(), 1) if workers and order != "old_per_example"
            else None}


def _run_case(store: Path, order: str, workers: int, cfg: dict) -> dict:
    cmd = [sys.executable, __file__, "--case", str(store), order, str(workers), "--config", json.dumps(cfg)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode != 0:
        raise RuntimeError(f"case {order}/{workers} on {store} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The stores and the table


def build_store(path: Path, n_positions: int, cfg: dict) -> dict:
    from first_kd.store import bytes_on_disk
    from first_kd.tiny import synthetic_store

    started = time.perf_counter()
    synthetic_store(path, n_positions // cfg["targets"], targets_per_sequence=cfg["targets"],
                    prompt_tokens=cfg["prompt"], k=cfg["k"], vocab_size=cfg["vocab"],
                    chunk_positions=cfg["chunk_positions"], seed=0)
    return {"n_positions": n_positions, "n_sequences": n_positions // cfg["targets"],
            "build_s": round(time.perf_counter() - started, 1), "bytes_on_disk": bytes_on_disk(path)}


def summarise(stores: dict, cases: dict) -> dict:
    small, large = _label(min(stores, key=int)), _label(max(stores, key=int))
    big = cases[large]
    ratios = {f"{order}_vs_sequential_{w}w": round(big[f"{order}/{w}"]["positions_per_s"]
                                                   / big[f"sequential/{w}"]["positions_per_s"], 3)
              for order in ("local", "random") for w in (0, 2)}
    rss = {label: {case: r["peak_rss_mb"] for case, r in by_case.items()} for label, by_case in cases.items()}
    workers_rss = {label: {case: r["peak_rss_worker_mb"] for case, r in by_case.items() if r["peak_rss_worker_mb"]}
                   for label, by_case in cases.items()}
    growth = {case: round(rss[large][case] - rss[small][case], 1) for case in rss[large]}
    growth.update({f"{case} (worker)": round(workers_rss[large][case] - workers_rss[small][case], 1)
                   for case in workers_rss[large]})
    met = {"local_within_2x_of_sequential": all(ratios[f"local_vs_sequential_{w}w"] >= TARGET_RATIO for w in (0, 2)),
           "rss_flat": all(g <= TARGET_RSS_GROWTH_MB for g in growth.values())}
    return {"ratios_at_largest": ratios, "peak_rss_mb": rss, "peak_rss_worker_mb": workers_rss,
            "rss_growth_mb_largest_vs_smallest": growth, "targets_met": met,
            "targets": {"local_vs_sequential": f">= {TARGET_RATIO}", "rss_growth_mb": f"<= {TARGET_RSS_GROWTH_MB}"}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small stores, short reads (about 1.5 minutes)")
    parser.add_argument("--out", help="where to save the JSON line (default benchmarks/results/bench_loader[.quick].json)")
    parser.add_argument("--case", nargs=3, metavar=("STORE", "ORDER", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # one case, in this fresh process
        store, order, workers = args.case
        print(json.dumps(read_case(store, order, int(workers), json.loads(args.config))))
        return 0

    import torch

    cfg = QUICK if args.quick else FULL
    load_start = os.getloadavg()
    stores, cases = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        for n in cfg["sizes"]:
            path = Path(tmp) / f"store-{_label(n)}.zarr"
            stores[n] = build_store(path, n, cfg)
            print(f"bench_loader: built {_label(n)} positions in {stores[n]['build_s']} s", file=sys.stderr)
            rounds = {f"{order}/{workers}": [] for order, workers in CASES}
            for _ in range(cfg["rounds"]):  # round-robin, so a change of the machine's load hits every case
                for order, workers in CASES:
                    result = _run_case(path, order, workers, cfg)
                    rounds[f"{order}/{workers}"].append(result)
                    print(f"bench_loader: {_label(n)} {order}/{workers}: {result['positions_per_s']:,} positions/s, "
                          f"peak RSS {result['peak_rss_mb']} MB (workers {result['peak_rss_worker_mb']})",
                          file=sys.stderr)
            # The best round of each case: the one the shared machine's load disturbed least.
            cases[_label(n)] = {case: {**max(runs, key=lambda r: r["positions_per_s"]),
                                       "positions_per_s_rounds": [r["positions_per_s"] for r in runs]}
                                for case, runs in rounds.items()}
    result = {**summarise(stores, cases), "stores": {_label(n): s for n, s in stores.items()}, "cases": cases,
              "config": cfg, "quick": args.quick, "device": "cpu", "cpu_count": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
              "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    line = json.dumps(result)
    print(line)
    out = Path(args.out) if args.out else RESULTS / ("bench_loader.quick.json" if args.quick else "bench_loader.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
