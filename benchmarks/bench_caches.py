"""What the cache keeps of the teacher's tail, and what that does to the student: top-5 vs top-p 0.95 vs a
sampled cache of the same bytes vs the full distribution (issue 15).

Run (from the repository root, venv active):

    python benchmarks/bench_caches.py --suite calibration --demo-dir runs/demo-s0 [--demo-dir ...]
    python benchmarks/bench_caches.py --suite reasoning --demo-dir runs/reasoning-s0 [--demo-dir ...]
    python benchmarks/bench_caches.py --suite text --seeds 0,1,2 [--work DIR] [--quick]

-> benchmarks/results/bench_caches.<suite>.json (one JSON line; `--quick`: .quick.json).

Demo suites: each --demo-dir is a finished `first-kd demo` run (`first-kd demo [--suite reasoning] --out DIR
seed=S`), one per seed: its own data, teacher and student initialisation. The script reads the demo's own
commands (DIR/commands.sh) and changes only what the comparison is about:
  * the train store: `cache` exactly as the demo ran it, with the row selection replaced by
        top5      --k 5                                     (the demo's own store: FIRST's cache)
        topp      --top-p 0.95 --k 64                       (variable k, capped at 64)
        sampled   --sample N --sample-seed S                (RS-KD; N below)
        full      --k V                                     (V = the teacher's vocabulary: the whole distribution)
  * the student: the demo's distilled student (calibration: `student_kd`; reasoning: `student_cot`) with
    `--loss kd` (no temperature: what each cache keeps of the raw teacher is the variable; FIRST's temperature
    applies the same way on top of any top-k or top-p store) on that store, no validation, same steps, lr,
    batch, schedule and seed (the demo's seed);
  * `evaluate` as the demo evaluates that student (calibration: the answer letter's probabilities; reasoning:
    greedy rationales, the answer extracted and its probability); for reasoning also token-level accuracy, ECE
    and NLL on the exact traces of the demo's 300 val problems (`token_*`), since a greedy answer has no NLL.
  Row `first_top5_T` is the demo's own FIRST student (top-5 store + the calibrated temperature; reasoning: the
  demo's student_cot) as the demo evaluated it: the temperature's effect beside the cache's.
N ("the same bytes"): the largest N in 1..255 whose sampled store, cached on the first 200 training records,
takes no more bytes per position on disk (ids, log-probs, counts, compressed) than the top-5 store of the
same records. A sampled row costs a slot per *distinct* id, and padding compresses to
almost nothing, so a peaked teacher affords many draws.

Text suite: bench_tail.py's free-text teacher (hidden 128, 2 layers, real GPT-2 tokenizer, vocab 50,257; its
top-5 keeps 0.62 of the mass) and students (hidden 64, 48 steps); seed S = the student's seed and the sample
seed (one teacher). No `full` row there: 35,385 positions x 50,257 fp32 is 7 GB.

Rows: accuracy, ECE, NLL (and Brier, mean confidence) of each student on the suite's test split, with the
store's bytes per position on disk and its mean ids per position; mean over seeds and per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tail import FULL, QUICK, RESULTS, run_cli, write_data  # noqa: E402

VARIANTS = ("top5", "topp", "sampled", "full")
PAPER_DRAWS = 12  # variant sampled12: the draws per position of Anshumann et al. (2025), whatever it costs here
MAX_DRAWS = 255
LADDER_RECORDS = 200
TOPP_CAP = 64
ROW_KEYS = ("accuracy", "ece", "nll", "brier", "mean_confidence")
TOKEN_KEYS = ("token_accuracy", "token_ece", "token_nll")  # reasoning: the gold traces scored token by token
# The demo student each suite compares, and how to find its commands in DIR/commands.sh.
DEMO_STUDENT = {"calibration": "student_kd", "reasoning": "student_cot"}
# The demo's own FIRST student (top-5 with the calibrated temperature), reported beside the rows for reference.
DEMO_FIRST = {"calibration": "student_first", "reasoning": "student_cot"}


def selection_args(variant: str, vocab: int, draws: int, seed: int) -> list[str]:
    return {"top5": ["--k", "5"], "topp": ["--top-p", "0.95", "--k", str(TOPP_CAP)],
            "sampled": ["--sample", str(draws), "--sample-seed", str(seed)],
            "sampled12": ["--sample", str(PAPER_DRAWS), "--sample-seed", str(seed)], "full": ["--k", str(vocab)]}[variant]


def replace_option(argv: list[str], flag: str, value) -> list[str]:
    """argv with FLAG's value replaced (or FLAG VALUE appended); value None removes FLAG and its value."""
    out = list(argv)
    if flag in out:
        i = out.index(flag)
        del out[i: i + 2]
    return out if value is None else out + [flag, str(value)]


def without_selection(argv: list[str]) -> list[str]:
    for flag in ("--k", "--top-p", "--sample", "--sample-seed"):
        argv = replace_option(argv, flag, None)
    return argv


def demo_commands(demo: Path, student: str, first: str) -> dict:
    """The demo's train-store `cache`, its `student` distill and that student's `evaluate`, and the `evaluate` of
    its FIRST student `first`, as argv lists."""
    found = {}
    for line in (demo / "commands.sh").read_text().splitlines():
        if not line.startswith("first-kd "):
            continue
        argv = shlex.split(line)[1:]
        out = argv[argv.index("--out") + 1] if "--out" in argv else ""
        if argv[0] == "cache" and out.endswith("stores/train.zarr"):
            found["cache"] = argv
        elif argv[0] == "distill" and out.endswith(f"runs/{student}"):
            found["distill"] = argv
        elif argv[0] == "evaluate" and argv[argv.index("--label") + 1] == student:
            found["evaluate"] = argv
        if argv[0] == "evaluate" and argv[argv.index("--label") + 1] == first:
            found["evaluate_first"] = argv
    missing = {"cache", "distill", "evaluate", "evaluate_first"} - set(found)
    if missing:
        raise SystemExit(f"bench_caches: {demo}/commands.sh lacks the {', '.join(sorted(missing))} command(s) of a "
                         f"finished demo: run `first-kd demo` there first")
    return found


def store_facts(path: Path) -> dict:
    from first_kd.store import verify

    s = verify(path)
    return {"bytes_per_position": round(s["bytes_per_position"], 3),
            "ids_per_position": round(float(s["mean_ids_per_position"]), 3),
            "mean_mass": round(s["mean_topk_mass"], 5), "n_positions": s["n_positions"]}


def choose_draws(cache_argv: list[str], work: Path, seed: int) -> dict:
    """N for `sampled`: the largest N in 1..255 whose sampled store of the first LADDER_RECORDS records costs no
    more bytes per position on disk than their top-5 store (bisection: the cost grows with N)."""
    base = replace_option(without_selection(cache_argv), "--limit", LADDER_RECORDS)
    probe, record = work / "ladder", work / f"ladder-s{seed}.json"
    if record.is_file():  # chosen by an earlier run of this work folder
        return json.loads(record.read_text())
    tried = {}

    def cost(args, name):
        out = probe / f"{name}.zarr"
        run_cli("cache", replace_option(base, "--out", out)[1:] + args)
        return store_facts(out)["bytes_per_position"]

    def sampled(n):
        tried[n] = cost(["--sample", str(n), "--sample-seed", str(seed)], f"sampled{n}")
        return tried[n]

    budget = cost(["--k", "5"], "top5")
    lo, hi = 1, MAX_DRAWS  # invariant: the answer is in [lo, hi]; lo fits unless even 1 draw does not
    if sampled(hi) <= budget:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sampled(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    shutil.rmtree(probe, ignore_errors=True)
    chosen = {"draws": lo, "top5_bytes": budget, "probed_bytes": dict(sorted(tried.items()))}
    record.write_text(json.dumps(chosen) + "\n")
    return chosen


def metrics_row(eval_dir: Path) -> dict:
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    summary = metrics.get("summary", metrics)
    for mode in ("auto", "greedy"):  # generation metrics are per mode
        if isinstance(summary.get(mode), dict):
            summary = summary[mode]
    return {k: summary[k] for k in ROW_KEYS if k in summary}


def token_metrics(demo: Path, model, out: Path) -> dict:
    """The model on the exact traces of the demo's val problems (held out: the demo logs validation on them,
    selects nothing), token by token over the full vocabulary (top-1 accuracy, ECE, NLL): how well it predicts
    a correct rationale, where its greedy answers only say whether it writes one."""
    run_cli("evaluate", ["--model", str(model), "--data", str(demo / "data" / "val.jsonl"), "--out", str(out),
                         "--label", out.name])
    row = metrics_row(out)
    return {f"token_{k}": row[k] for k in ("accuracy", "ece", "nll") if k in row}


def teacher_vocab(teacher: Path) -> int:
    return int(json.loads((teacher / "config.json").read_text())["vocab_size"])


def run_demo_seed(demo: Path, suite: str, variants: tuple, progress) -> dict:
    """Every variant's store, student and evaluation for one finished demo directory."""
    cmds = demo_commands(demo, DEMO_STUDENT[suite], DEMO_FIRST[suite])
    seed = int(cmds["distill"][cmds["distill"].index("--seed") + 1])
    work = demo / "caches"
    work.mkdir(exist_ok=True)
    vocab = teacher_vocab(Path(cmds["cache"][cmds["cache"].index("--teacher") + 1]))
    result = {"seed": seed, "vocab": vocab, "rows": {}}
    result["sampled_choice"] = choose_draws(cmds["cache"], work, seed) if "sampled" in variants else None
    for variant in variants:
        started = time.perf_counter()
        draws = (result["sampled_choice"] or {}).get("draws", 0)
        store = work / f"train-{variant}.zarr"
        run_cli("cache", replace_option(without_selection(cmds["cache"]), "--out", store)[1:]
                + selection_args(variant, vocab, draws, seed))
        run_dir, eval_dir = work / f"student-{variant}", work / f"eval-{variant}"
        distill = replace_option(replace_option(cmds["distill"], "--store", store), "--out", run_dir)
        distill = replace_option(replace_option(replace_option(distill, "--loss", "kd"), "--val-store", None),
                                 "--eval-every", None)
        distill = [a for a in distill if a != "--other-bucket"]  # the default already
        run_cli("distill", distill[1:])
        evaluate = replace_option(replace_option(cmds["evaluate"], "--model", run_dir / "model"), "--out", eval_dir)
        run_cli("evaluate", replace_option(evaluate, "--label", f"{variant}-s{seed}")[1:])
        row = {**metrics_row(eval_dir), **store_facts(store), "seconds": round(time.perf_counter() - started, 1)}
        if suite == "reasoning":
            row.update(token_metrics(demo, run_dir / "model", work / f"eval-tokens-{variant}"))
        result["rows"][variant] = row
        progress(f"{demo.name} {variant}: {row}")
    # The demo's FIRST student, evaluated by the demo's own command (a no-op when the demo got that far).
    run_cli("evaluate", cmds["evaluate_first"][1:])
    first = Path(cmds["evaluate_first"][cmds["evaluate_first"].index("--out") + 1])
    if "top5" in result["rows"] and suite == "reasoning":
        model = cmds["evaluate_first"][cmds["evaluate_first"].index("--model") + 1]
        result["first_tokens"] = token_metrics(demo, model, work / "eval-tokens-first")
    if "top5" in result["rows"]:
        # the same top-5 store's bytes: the demo's FIRST student trains on the demo's own top-5 store
        result["rows"]["first_top5_T"] = {**metrics_row(first), **{k: result["rows"]["top5"][k] for k in
                                                                 ("bytes_per_position", "ids_per_position", "mean_mass")},
                                            **result.get("first_tokens", {})}
    return result


def run_text_seed(work: Path, cfg: dict, seed: int, variants: tuple, progress) -> dict:
    """bench_tail's teacher and data (trained / written once in WORK), every variant's student for one seed."""
    from bench_cache import _gpt2_tokenizer, train_teacher

    from first_kd.tiny import build_llama

    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        (work / "teacher_training.json").write_text(json.dumps(train_teacher(teacher, cfg, lambda **kw: _Quiet())))
    paths = write_data(work, cfg)
    init = work / "student_init"
    if not (init / "config.json").is_file():
        build_llama(init, _gpt2_tokenizer(), hidden_size=cfg["s_hidden"], num_layers=cfg["s_layers"],
                    num_heads=cfg["s_heads"], max_position_embeddings=512, seed=0)
    cache = ["cache", "--teacher", str(teacher), "--data", str(paths["distill"]), "--out", "X", "--batch-size",
             str(cfg["cache_batch"])]
    result = {"seed": seed, "vocab": teacher_vocab(teacher), "rows": {}}
    result["sampled_choice"] = choose_draws(cache, work / f"s{seed}", seed) if "sampled" in variants else None
    for variant in variants:
        started = time.perf_counter()
        draws = (result["sampled_choice"] or {}).get("draws", 0)
        # top-5 and top-p stores do not depend on the seed: cached once
        store = work / (f"distill-{variant}-s{seed}.zarr" if variant.startswith("sampled") else f"distill-{variant}.zarr")
        run_cli("cache", replace_option(cache, "--out", store)[1:] + selection_args(variant, 0, draws, seed))
        run_dir, eval_dir = work / "runs" / f"{variant}-s{seed}", work / "eval" / f"{variant}-s{seed}"
        run_cli("distill", ["--store", str(store), "--loss", "kd", "--student", str(init), "--max-steps",
                            str(cfg["s_steps"]), "--batch-size", str(cfg["s_batch"]), "--lr", str(cfg["s_lr"]),
                            "--warmup", str(cfg["s_warmup"]), "--seed", str(seed), "--save-every", "0",
                            "--log-every", "10", "--chunk-size", str(cfg["s_chunk"]), "--out", str(run_dir)])
        run_cli("evaluate", ["--model", str(run_dir / "model"), "--data", str(paths["test"]), "--out", str(eval_dir),
                             "--label", f"{variant}-s{seed}", "--batch-size", str(cfg["eval_batch"]), "--dtype",
                             "float32"])
        row = {**metrics_row(eval_dir), **store_facts(store), "seconds": round(time.perf_counter() - started, 1)}
        result["rows"][variant] = row
        progress(f"text seed {seed} {variant}: {row}")
    return result


class _Quiet:
    """A stand-in progress bar for train_teacher."""

    def update(self, *a, **k):
        pass

    def set_postfix(self, *a, **k):
        pass

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass


def summarise(seeds: list[dict], variants: tuple) -> dict:
    """Mean and per-seed values of each row's figures."""
    table = {}
    for variant in variants:
        rows = [s["rows"][variant] for s in seeds if variant in s["rows"]]
        table[variant] = {key: {"mean": round(statistics.fmean(r[key] for r in rows), 4),
                                "per_seed": [r[key] for r in rows]}
                          for key in (*ROW_KEYS, *TOKEN_KEYS, "bytes_per_position", "ids_per_position", "mean_mass")
                          if rows and all(isinstance(r.get(key), (int, float)) for r in rows)}
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=("calibration", "reasoning", "text"), required=True)
    parser.add_argument("--demo-dir", action="append", default=[], help="a finished demo run (one per seed)")
    parser.add_argument("--seeds", default="0,1,2", help="text suite: student / sample seeds")
    parser.add_argument("--work", help="text suite: keep the teacher, stores and runs here (reused when present)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="text suite: bench_tail's smoke config")
    parser.add_argument("--out", help="where to write the JSON line")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    variants = tuple(v for v in args.variants.split(",") if v)
    if args.suite == "text":
        variants = tuple(v for v in variants if v != "full")
    started, load = time.perf_counter(), os.getloadavg()

    def progress(message):
        print(f"bench_caches: {message}", file=sys.stderr, flush=True)

    if args.suite == "text":
        cfg = dict(QUICK if args.quick else FULL)
        work = Path(args.work or (Path(tempfile.gettempdir()) / "bench_caches_text"))
        work.mkdir(parents=True, exist_ok=True)
        seeds = [run_text_seed(work, cfg, int(s), variants, progress) for s in args.seeds.split(",")]
    else:
        if not args.demo_dir:
            parser.error("--demo-dir is required for the demo suites (one finished `first-kd demo` run per seed)")
        seeds = [run_demo_seed(Path(d), args.suite, variants, progress) for d in args.demo_dir]
    rows = variants + (("first_top5_T",) if args.suite != "text" and "top5" in variants else ())
    result = {"suite": args.suite, "variants": list(variants), "table": summarise(seeds, rows), "seeds": seeds,
              "total_s": round(time.perf_counter() - started, 1), "loadavg_start": [round(x, 2) for x in load],
              "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    line = json.dumps(result)
    print(line)
    name = f"bench_caches.{args.suite}" + (".quick" if args.quick else "") + ".json"
    out = Path(args.out) if args.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
