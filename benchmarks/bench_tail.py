"""Students of a flat text teacher: ce vs first vs kd (and variants), token-level accuracy / ECE / NLL.

Run (full config: 9-19 minutes on the 2-core CPU, depending on its load; --quick: a ~45-second smoke run):

    python benchmarks/bench_tail.py            # one JSON line, also written to benchmarks/results/bench_tail.json
    python benchmarks/bench_tail.py --quick    # writes benchmarks/results/bench_tail.quick.json instead
    python benchmarks/bench_tail.py --work DIR [--students first_authors]   # keep / reuse DIR (see --help)

Needs ../shared/data (ARC-Easy, CommonsenseQA, the GPT-2 tokenizer); nothing is downloaded.

The FIRST paper's teachers are concentrated (top-5 mass ~1). This is the other regime (issue 17's third
setting): a teacher whose probability mass outside its top-5 is real, so the distillation defaults are
chosen on evidence from both.

Setup (every first-kd step through first_kd.cli.main, as a user would run it):
  1. Teacher: bench_cache.py's free-text teacher (its `train_teacher`: a Llama, hidden 128, 2 layers, the
     real GPT-2 tokenizer, vocab 50,257, trained from scratch with AdamW on ARC-Easy train in the Alpaca
     prompt + CommonsenseQA question/answer text), with fewer steps than bench_cache's 250 to fit the budget.
  2. Data: free-text prompt/response records as bench_cache's `text` store: prompt "### Instruction:\\n",
     response = the rest of the Alpaca-rendered question and its answer line (+ eos), so nearly every
     target position predicts free text. distill.jsonl = ARC-Easy train (the teacher's own training data,
     as FIRST caches a fine-tuned teacher over its training set); val.jsonl and test.jsonl = disjoint
     slices of ARC-Easy test (held out from teacher and students).
  3. `first-kd cache` (k=5) over distill, val and test; `first-kd calibrate --form logit` (temperature
     scaling, NLL) of the distill store on the val store.
  4. Students: one smaller Llama (same tokenizer), built once (seed 0) and trained from that same init
     with the same steps, batch, lr schedule and seed by `first-kd distill`:
       ce            --loss ce --data distill.jsonl                       (plain fine-tuning)
       first         --loss first                                         (defaults: other bucket, T)
       kd            --loss kd                                            (defaults: other bucket, no T)
       first_renorm  --loss first --no-other-bucket                       (the old default)
       first_prob    --loss first --student-norm prob-softmax             (the authors' student side)
       first_alpha   --loss first --alpha 0.5                             (half CE)
     and, opt-in with --students, first_authors: the FIRST authors' pairing (prob-softmax on both sides,
     no bucket, on copies of the stores calibrated with --form prob; see STUDENTS).
  5. `first-kd evaluate --model M --data test.jsonl` for each student and the teacher: token-level,
     full vocabulary (top-1 accuracy, ECE over 10 bins, NLL, Brier, mean confidence). Also `topk_mass`:
     the model's mean full-vocabulary probability on the teacher's top-5 ids at the test positions (the
     teacher's own value is its store's mean top-5 mass): whether a student's mass tracks the teacher's.

Sizes (chosen for the 20-minute budget on a shared 2-core CPU): teacher 90 AdamW steps of 8 x 128 tokens
(lr 3e-3, bench_cache's recipe; train loss 10.86 -> 3.38); 384 distill records (35,385 target positions),
120 val (11,070), 100 test (9,423). Students: Llama hidden 64, 2 layers, 4 heads, 48 steps of 8 records
(one epoch), lr 1e-2 (warmup 5, cosine), --chunk-size 256, seed 0. (At lr 3e-3 and 48 steps every student
was still near-uniform, mean confidence 0.03-0.06, so ECE measured only how far each had got from it.)

Figures measured (CPU, torch 2.13.0+cpu; benchmarks/results/bench_tail.json; fixed seeds: a second run gave
bit-identical rows). Teacher: top-5 mass 0.621 on the distill store (0.614 on test, p10 0.12), so a third
of its mass is outside the top-5 (bench_cache's 250-step teacher: 0.685). Temperature (--form logit, NLL
on the renormalised top-k at the 66% of val positions whose target is in it): T = 0.712, which sharpens and
raised that top-k ECE 0.120 -> 0.141. Test, token level, full vocabulary, 9,423 positions:

    model          accuracy   ECE     NLL    Brier   mean conf  top-5 mass  options
    teacher         0.566    0.078   3.214   0.511    0.491      0.614
    ce              0.448    0.086   3.699   0.640    0.369      0.525      --loss ce --data distill.jsonl
    first           0.435    0.089   4.822   0.647    0.444      0.583      --loss first (defaults)
    kd              0.437    0.076   4.763   0.642    0.415      0.578      --loss kd (defaults)
    first_renorm    0.371    0.368   8.394   0.996    0.002      0.002      --loss first --no-other-bucket
    first_prob      0.287    0.457   8.537   1.108    0.744      0.419      --loss first --student-norm prob-softmax
    first_alpha     0.432    0.085   3.745   0.655    0.360      0.519      --loss first --alpha 0.5
    first_authors   0.420    0.146   6.670   0.812    0.566      0.409      opt-in (STUDENTS), prob c = 0.16

  first_authors: `--work DIR --students first_authors` on the same DIR (results/bench_tail.authors.json).
  Best student: accuracy ce; ECE kd, with ce, first and first_alpha within 0.013 of it (one seed: about a
  tie); NLL ce, first_alpha +0.05. The bucketed default beats the old renormalised one on all three
  (first vs first_renorm: accuracy +0.065, ECE -0.279, NLL -3.57): the renormalised student keeps 0.2% of
  its mass on the teacher's top-5 (a broken next-token distribution), the bucketed ones 58% against the
  teacher's 61%. What the bucket cannot carry on a flat teacher is the tail's shape: the KL-only students
  trail ce by ~1.1 nats of NLL (targets outside the teacher's top-5 get too little mass); half CE
  (--alpha 0.5) closes that to 0.05 at the same ECE. The temperature does not help here (first vs kd:
  ECE 0.089 vs 0.076, NLL 4.82 vs 4.76): this teacher is calibrated on the full vocabulary already (ECE
  0.078). first_prob pairs the authors' student side with the logit-form target: softmax(q / 1) over
  probabilities cannot be sharp, so it drives its top-1 q towards 1 (conf 0.74 at accuracy 0.29); the
  authors' own pairing (first_authors) is better but still behind ce, first and kd on every figure. In an
  exploratory run (students lr 3e-3, 80 steps; teacher 100 steps; 300 test records; not kept)
  first_renorm had the best top-1 accuracy (0.506 vs ce 0.465, first 0.472) at mean confidence 0.001: its
  ranking can be good while its probabilities are useless.

Seconds per phase of the committed run (loadavg 2.4 -> 4.4; total 1139.5 s = 19.0 min): teacher 239, cache
40 + 11 + 9, calibrate 0.3, distill ce 139 / first 136 / kd 111 / first_renorm 28 / first_prob 175 /
first_alpha 65, evaluate ~20 each (teacher 9), top-5 mass and the rest 57. A second run with load rising
from 1.3 to 4.0: 554.7 s = 9.2 min (teacher 65, ce 15). A phase moves 2-10x with the load; compare rows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache import ALPACA_PROMPT, DATA, RESULTS, _gpt2_tokenizer, _load, train_teacher  # noqa: E402

FULL = dict(
    # teacher (bench_cache's model; fewer steps than its 250)
    hidden=128, layers=2, heads=4, train_steps=90, train_batch=8, train_seq=128, lr=3e-3, warmup_steps=10,
    # data (records; ~95 tokens each) and the teacher passes
    n_distill=384, n_val=120, n_test=100, cache_batch=16, k=5,
    # students
    s_hidden=64, s_layers=2, s_heads=4, s_steps=48, s_batch=8, s_lr=1e-2, s_warmup=5, s_chunk=256, eval_batch=16,
    students=("ce", "first", "kd", "first_renorm", "first_prob", "first_alpha"),
)
QUICK = dict(
    hidden=32, layers=1, heads=2, train_steps=4, train_batch=4, train_seq=64, lr=3e-3, warmup_steps=1,
    n_distill=24, n_val=16, n_test=16, cache_batch=8, k=5,
    s_hidden=16, s_layers=1, s_heads=2, s_steps=3, s_batch=4, s_lr=1e-2, s_warmup=1, s_chunk=256, eval_batch=8,
    students=("ce", "first", "kd", "first_renorm", "first_prob", "first_alpha"),
)
# The options of each student beside the shared ones (data source, loss, variant flags).
STUDENTS = {
    "ce": ["--loss", "ce"],
    "first": ["--loss", "first"],
    "kd": ["--loss", "kd"],
    "first_renorm": ["--loss", "first", "--no-other-bucket"],
    "first_prob": ["--loss", "first", "--student-norm", "prob-softmax"],
    "first_alpha": ["--loss", "first", "--alpha", "0.5"],
    # Opt-in (--students): the FIRST authors' pairing, prob-softmax on both sides over the top-k only, on
    # copies of the stores calibrated with --form prob (c by ECE); --student-temperature is set to the
    # fitted c, so the objective is zero where the student's top-k probabilities equal the teacher's up
    # to a shift (our choice: the authors' student temperature is not given by their formulas).
    "first_authors": ["--loss", "first", "--no-other-bucket", "--teacher-norm", "prob-softmax",
                      "--student-norm", "prob-softmax"],
}
PROB_STUDENTS = ("first_authors",)  # trained on the --form prob copies of the stores
TEACHER_KEYS = ("hidden", "layers", "heads", "train_steps", "train_batch", "train_seq", "lr", "warmup_steps")
ROW_KEYS = ("accuracy", "ece", "nll", "brier", "mean_confidence", "mce", "n")


def run_cli(command: str, args: list[str]) -> tuple[float, str]:
    """`first-kd COMMAND ARGS` in this process (its bars and notes captured); returns (seconds, output)."""
    from first_kd.cli import main

    buf = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main([command, *args])
    seconds = time.perf_counter() - started
    if rc != 0:
        raise RuntimeError(f"first-kd {command} {' '.join(args)} exited {rc}:\n{buf.getvalue()[-3000:]}")
    return seconds, buf.getvalue()


def text_record(rid: str, r: dict) -> dict:
    """An Alpaca ARC record as free text, exactly as bench_cache's `text` store renders it."""
    response = ALPACA_PROMPT.format(instruction=r["instruction"]).split("\n", 1)[1] + r["output"]
    return {"id": rid, "prompt": "### Instruction:\n", "response": response}


def write_data(work: Path, cfg: dict) -> dict:
    train, test = _load("arc_easy/train.json"), _load("arc_easy/test.json")
    n_val, n_test = cfg["n_val"], cfg["n_test"]
    splits = {
        "distill": [text_record(f"arc-train-{i}", r) for i, r in enumerate(train[: cfg["n_distill"]])],
        "val": [text_record(f"arc-test-{i}", r) for i, r in enumerate(test[:n_val])],
        "test": [text_record(f"arc-test-{i}", r) for i, r in enumerate(test[n_val: n_val + n_test], start=n_val)],
    }
    paths = {}
    for name, records in splits.items():
        paths[name] = work / f"{name}.jsonl"
        text = "".join(json.dumps(rec) + "\n" for rec in records)
        if not (paths[name].is_file() and paths[name].read_text() == text):  # a reused file keeps its mtime,
            paths[name].write_text(text)                                       # which `evaluate` fingerprints
    return paths


def store_summary(path: Path) -> dict:
    from first_kd.store import verify

    s = verify(path)
    return {k: (round(s[k], 4) if isinstance(s[k], float) else s[k])
            for k in ("n_sequences", "n_positions", "mean_topk_mass", "topk_mass_p10") if k in s}


def topk_mass(model_dir: Path, store_path: Path, batch: int) -> float:
    """Mean full-vocabulary probability the model puts on the teacher's top-k ids at the store's positions."""
    import torch
    from transformers import AutoModelForCausalLM

    from first_kd.batching import pad_right
    from first_kd.store import open_store

    store = open_store(store_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    recs = [store.get(i, temperature=False) for i in range(len(store))]
    with torch.inference_mode():
        for s in range(0, len(recs), batch):
            chunk = recs[s: s + batch]
            ids, mask = pad_right([torch.from_numpy(r["input_ids"]).long() for r in chunk], 0)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            for b, r in enumerate(chunk):
                pos = torch.from_numpy(r["target_positions"]).long()
                logp = torch.log_softmax(logits[b, pos], dim=-1)
                mass = logp.gather(1, torch.from_numpy(r["topk_ids"]).long()).exp().sum(-1)
                total += float(mass.sum())
                count += len(pos)
    return total / max(count, 1)


def evaluate(model_dir: Path, data: Path, out: Path, label: str, batch: int) -> tuple[float, dict]:
    seconds, _ = run_cli("evaluate", ["--model", str(model_dir), "--data", str(data), "--out", str(out),
                                      "--label", label, "--batch-size", str(batch), "--dtype", "float32"])
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics.get("summary", metrics)
    return seconds, {k: summary[k] for k in ROW_KEYS if k in summary}


def run(work: Path, cfg: dict, progress) -> dict:
    from first_kd.tiny import build_llama

    phases, result = {}, {}
    bar = progress(total=5 + 2 * len(cfg["students"]) + 1, desc="bench_tail", leave=False)

    def step(name):
        bar.set_postfix_str(name)

    # 1. teacher
    step("train teacher")
    started = time.perf_counter()
    teacher, training_json = work / "teacher", work / "teacher_training.json"
    teacher_cfg = {k: cfg[k] for k in TEACHER_KEYS}
    if training_json.is_file():  # a --work folder from an earlier run: the same teacher (fixed seeds)
        earlier = json.loads(training_json.read_text())
        if earlier.get("config") != teacher_cfg:
            raise RuntimeError(f"{work} holds a teacher of another config ({earlier.get('config')}); "
                               "use another --work folder")
        result["teacher_training"] = dict(earlier, reused=True)
    else:
        result["teacher_training"] = dict(train_teacher(teacher, cfg, progress), config=teacher_cfg)
        training_json.write_text(json.dumps(result["teacher_training"]) + "\n")
    phases["teacher_train_s"] = round(time.perf_counter() - started, 1)
    bar.update()

    # 2-3. data, teacher passes, temperature
    paths = write_data(work, cfg)
    stores, cache_s = {}, {}
    for name in ("distill", "val", "test"):
        step(f"cache {name}")
        stores[name] = work / f"{name}.zarr"
        cache_s[name], _ = run_cli("cache", ["--teacher", str(teacher), "--data", str(paths[name]), "--out",
                                             str(stores[name]), "--k", str(cfg["k"]), "--batch-size",
                                             str(cfg["cache_batch"])])
        bar.update()
    phases["cache_s"] = {k: round(v, 1) for k, v in cache_s.items()}
    step("calibrate")
    calib_s, calib_out = run_cli("calibrate", ["--store", str(stores["distill"]), "--val-store", str(stores["val"]),
                                               "--form", "logit"])
    phases["calibrate_s"] = round(calib_s, 1)
    from first_kd.store import open_store

    result["temperature"] = open_store(stores["distill"]).temperature
    result["calibrate_output"] = calib_out.strip().splitlines()[-6:]
    result["stores"] = {name: store_summary(path) for name, path in stores.items()}
    if any(name in PROB_STUDENTS for name in cfg["students"]):
        for name in ("distill", "val"):
            stores[f"{name}_prob"] = work / f"{name}_prob.zarr"
            if not stores[f"{name}_prob"].exists():
                shutil.copytree(stores[name], stores[f"{name}_prob"])
        run_cli("calibrate", ["--store", str(stores["distill_prob"]), "--val-store", str(stores["val_prob"]),
                              "--form", "prob"])
        result["temperature_prob"] = open_store(stores["distill_prob"]).temperature
    bar.update()

    # 4. students
    init = work / "student_init"
    if not (init / "config.json").is_file():
        build_llama(init, _gpt2_tokenizer(), hidden_size=cfg["s_hidden"], num_layers=cfg["s_layers"],
                    num_heads=cfg["s_heads"], max_position_embeddings=512, seed=0)
    shared = ["--student", str(init), "--max-steps", str(cfg["s_steps"]), "--batch-size", str(cfg["s_batch"]),
              "--lr", str(cfg["s_lr"]), "--warmup", str(cfg["s_warmup"]), "--seed", "0", "--save-every", "0",
              "--log-every", "10", "--chunk-size", str(cfg["s_chunk"])]
    rows, train_s, eval_s = {}, {}, {}
    for name in cfg["students"]:
        step(f"distill {name}")
        options = list(STUDENTS[name])
        if name == "ce":
            source = ["--data", str(paths["distill"])]
        elif name in PROB_STUDENTS:
            source = ["--store", str(stores["distill_prob"])]
            options += ["--student-temperature", repr(float(result["temperature_prob"]["value"]))]
        else:
            source = ["--store", str(stores["distill"])]
        run_dir = work / "runs" / name
        train_s[name], _ = run_cli("distill", [*source, *options, *shared, "--out", str(run_dir)])
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses = [x["loss"] for x in lines if "loss" in x]
        bar.update()
        step(f"evaluate {name}")
        eval_s[name], row = evaluate(run_dir / "model", paths["test"], work / "eval" / name, name, cfg["eval_batch"])
        row["topk_mass"] = topk_mass(run_dir / "model", stores["test"], cfg["eval_batch"])
        row["train_loss_last"] = losses[-1] if losses else None
        row["options"] = " ".join(options)
        rows[name] = row
        bar.update()
    step("evaluate teacher")
    eval_s["teacher"], row = evaluate(teacher, paths["test"], work / "eval" / "teacher", "teacher", cfg["eval_batch"])
    row["topk_mass"] = result["stores"]["test"]["mean_topk_mass"]
    bar.update()
    bar.close()
    phases["distill_s"] = {k: round(v, 1) for k, v in train_s.items()}
    phases["evaluate_s"] = {k: round(v, 1) for k, v in eval_s.items()}
    result["teacher"] = row
    result["students"] = rows
    result["phases"] = phases
    return result


def verdict(rows: dict) -> dict:
    """Which student is best on each figure, and bucketed vs renormalised first."""
    best = {"accuracy": max(rows, key=lambda n: rows[n]["accuracy"]),
            "ece": min(rows, key=lambda n: rows[n]["ece"]),
            "nll": min(rows, key=lambda n: rows[n]["nll"])}
    out = {"best": best}
    if "first" in rows and "first_renorm" in rows:
        a, b = rows["first"], rows["first_renorm"]
        out["first_vs_first_renorm"] = {
            "accuracy": round(a["accuracy"] - b["accuracy"], 4), "ece": round(a["ece"] - b["ece"], 4),
            "nll": round(a["nll"] - b["nll"], 4),
            "bucket_better_on": [k for k in ("accuracy", "ece", "nll")
                                 if (a[k] > b[k] if k == "accuracy" else a[k] < b[k])]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke config (about a minute)")
    parser.add_argument("--out", help="where to save the JSON line (default benchmarks/results/bench_tail[.quick].json)")
    parser.add_argument("--work", help="keep the work folder (teacher, stores, runs, evaluations) here; a folder "
                        "from an earlier run of the same config is reused: the teacher is not trained again and "
                        "every first-kd step finished there is a no-op, so another student costs that student only")
    parser.add_argument("--students", help=f"comma-separated students to train (of {', '.join(STUDENTS)}; "
                        "default: all but first_authors)")
    args = parser.parse_args(argv)
    if not (DATA / "arc_easy" / "test.json").is_file():
        print(f"bench_tail: error: {DATA} is missing: this benchmark needs the shared data (ARC-Easy, "
              "CommonsenseQA, GPT-2 tokenizer) beside the project", file=sys.stderr)
        return 2

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import functools

    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    progress = functools.partial(tqdm, file=sys.stderr, dynamic_ncols=True)

    cfg = dict(QUICK if args.quick else FULL)
    if args.students:
        cfg["students"] = tuple(n.strip() for n in args.students.split(",") if n.strip())
        unknown = [n for n in cfg["students"] if n not in STUDENTS]
        if unknown or not cfg["students"]:
            print(f"bench_tail: error: unknown student(s) {', '.join(unknown) or '(none given)'}: choose from "
                  f"{', '.join(STUDENTS)}", file=sys.stderr)
            return 2
    load_start = os.getloadavg()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.work:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_tail_")))
        result = run(work, cfg, progress)
    result.update(
        verdict(result["students"]),
        total_s=round(time.perf_counter() - started, 1), config={k: (list(v) if isinstance(v, tuple) else v)
                                                                   for k, v in cfg.items()},
        quick=args.quick, device="cpu", cpu_threads=torch.get_num_threads(), torch=torch.__version__,
        loadavg_start=[round(x, 2) for x in load_start], loadavg_end=[round(x, 2) for x in os.getloadavg()],
    )
    line = json.dumps(result)
    print(line)
    out = Path(args.out) if args.out else RESULTS / ("bench_tail.quick.json" if args.quick else "bench_tail.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
