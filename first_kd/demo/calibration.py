"""`first-kd demo` (the calibration suite): the whole FIRST story on tiny models and data built here, on a CPU, in minutes.

The task (why it is a fair test of calibration)
-----------------------------------------------
A made-up world of `n_items` objects with a hidden weight order. Each question shows five distinct
objects as options A-E and asks "Which is heaviest?"; the true answer follows from the order, so a
tiny model can learn the rule from examples and apply it to option sets it has never seen. Then every
label of the benchmark splits (train, val, test) is replaced with probability `eps` by one of the four
wrong options, uniformly.
The noise is irreducible (it does not depend on the question), so the best possible model answers
with the rule, is right 1 - eps of the time on held-out data, and is calibrated exactly when it says
so: confidence 1 - eps on its answer. Accuracy and confidence are scored against the noisy test
labels, as a user would score against a real benchmark's labels.

Splits (DIR/data/*.jsonl): `teacher` (the teacher's own fine-tuning data, never seen by the students),
`train` (the students' data: `ce` learns its labels, `kd`/`first` the teacher's top-k on its
questions), `val` (where the temperature is fitted) and `test` (every reported number). train, val and
test carry the label noise eps. The teacher's split is clean by default (`teacher_eps` = 0): the teacher
plays a strong model that knows the rule, so it answers with the rule and near-certainty, and on the
noisy benchmark it is right only 1 - eps of the time: over-confident, with errors that are exactly the
label noise. That is the situation FIRST addresses (a teacher whose top-k is sharper than its
accuracy), and the one in which a temperature can fix the teacher for every question at once.

Why not a teacher that memorises the noisy labels of its own split (`teacher_eps` = eps)? A CPU-sized
teacher becomes over-confident only by memorising them, and memorising random labels costs it the
rule: with the default budget and teacher_eps = 0.25 (seed 0) its test accuracy falls to 0.62 (0.74
with the clean split; Bayes-optimal 0.75). Its errors are then per question, which no single
temperature undoes, and the FIRST student, which averages them out and ends more accurate than its
targets, comes out under-confident (accuracy 0.64 at confidence 0.61). The option stays so that the
experiment can be re-run (docs/demo-results.md).

The story
---------
1. data, a byte-level BPE tokenizer trained on it, an untrained teacher and a smaller student
   (first_kd.tiny), saved and re-loaded with from_pretrained by every command;
2. `distill --loss ce` fine-tunes the teacher on its split until it is accurate and near-certain;
3. `cache` keeps the teacher's top-5 on the train, val and test questions; `calibrate` fits the
   temperature on val (FIRST's prob form by default) and records it in the train and test stores;
4. three students from the same initialisation, data order and budget: `ce` (the labels), `kd` (the
   raw top-5), `first` (the top-5 after temperature);
5. `evaluate` the teacher from the test store without and with temperature, and the students on the
   test questions; `report` collects them into DIR/report.md, DIR/report.json, DIR/reliability.png.

Every step is a public command run through first_kd.cli.main, listed in DIR/commands.sh. Re-running
the demo on its own DIR skips the finished steps (and resumes an interrupted one); a DIR made with
other options is refused.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from first_kd import metrics
from first_kd.demo.runner import (Layout, Step, calibrated_from, check_lines, checks_table, finish, read_json, require,
                                  run_facts, run_steps, store_complete, store_temperature, teacher_step, text_table,
                                  where_line, write_jsonl)
from first_kd.errors import FirstKDError

LETTERS = "ABCDE"
N_OPTIONS = len(LETTERS)
QUESTION = "Which is heaviest?"
MODEL_LABELS = ("teacher", "teacher_ts", "student_ce", "student_kd", "student_ls", "student_first")
# The students: name -> (distill --loss, extra options, what it is). `ls` is the FIRST paper's "Distill w/
# LS" baseline: KD whose teacher top-k has LS_FACTOR of its top-1 probability spread over the other ids, a
# fixed smoothing instead of a temperature fitted on held-out data.
LS_FACTOR = 0.1
STUDENTS = {
    "ce": ("ce", [], "student fine-tuned on the (noisy) labels of the train split"),
    "kd": ("kd", [], "student distilled from the raw teacher top-k (no temperature)"),
    "ls": ("kd", ["--teacher-smoothing", str(LS_FACTOR)],
           f"student distilled from the teacher top-k label-smoothed by {LS_FACTOR} (Distill w/ LS)"),
    "first": ("first", [], "student distilled from the temperature-calibrated teacher top-k (FIRST)"),
}
STUDENT_LOSSES = tuple(STUDENTS)
# Consonant-vowel syllables for made-up object names: pronounceable, so BPE learns each name as one token.
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
# How the printed summary heads a metrics.MODEL_SUMMARY_KEYS column (the others by their key).
SCORE_HEADINGS = {"ece": "ECE", "mce": "MCE", "brier": "Brier", "nll": "NLL", "mean_confidence": "mean conf."}
# The suite's values of the suite-dependent options of DemoConfig (first_kd.demo.main).
DEFAULTS = dict(n_items=20, eps=0.25, teacher_eps=0.0, n_teacher=1000, n_train=1000, n_val=1000, n_test=2000,
                vocab_size=512, teacher_hidden=96, teacher_layers=3, student_hidden=64, student_layers=2,
                teacher_steps=1000, teacher_lr=2e-3, student_steps=1500, student_lr=3e-3)


def check_options(cfg) -> None:
    """The suite's own checks of a resolved DemoConfig (the shared ones are DemoConfig.validate's)."""
    checks = [
        (cfg.n_items >= N_OPTIONS, f"--n-items must be >= {N_OPTIONS} (one per option); got {cfg.n_items}"),
        (0.0 <= cfg.eps < 1.0 - 1.0 / N_OPTIONS and 0.0 <= cfg.teacher_eps < 1.0 - 1.0 / N_OPTIONS,
         f"--eps and --teacher-eps must be in [0, {1 - 1 / N_OPTIONS:g}) so the true answer stays the "
         f"likeliest label; got {cfg.eps} and {cfg.teacher_eps}"),
        (cfg.k >= N_OPTIONS, f"--k must be >= {N_OPTIONS} to hold every option letter; got {cfg.k}"),
    ]
    require(checks)


# ----------------------------------------------------------------------------------------------
# The task: pure functions of a random generator
# ----------------------------------------------------------------------------------------------


def make_items(rng: random.Random, n: int) -> list[str]:
    """`n` distinct made-up object names, lightest first (the list order is the hidden weight order)."""
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(2)) + rng.choice(CONSONANTS))
    items = sorted(names)
    rng.shuffle(items)  # the alphabet must say nothing about the weight
    return items


def make_question(rng: random.Random, items: list[str], eps: float, qid: str) -> dict:
    """One record: five distinct options, the true (heaviest) answer, and the label shown to models.

    The label is the true answer with probability 1 - eps, else one of the four others uniformly."""
    picked = rng.sample(range(len(items)), N_OPTIONS)  # indices into items = weight ranks
    true = max(range(N_OPTIONS), key=lambda j: picked[j])
    # Both draws happen whatever eps is, so the questions of a split do not depend on its noise level.
    flip = rng.random() < eps
    wrong = rng.choice([j for j in range(N_OPTIONS) if j != true])
    label = wrong if flip else true
    return {"id": qid, "question": QUESTION, "choices": [items[i] for i in picked],
            "answer": LETTERS[label], "true_answer": LETTERS[true]}


def make_splits(seed: int, n_items: int,
                splits: dict[str, tuple[int, float]]) -> tuple[list[str], dict[str, list[dict]]]:
    """(items lightest first, {split: records}) for {split: (size, label noise eps)}: a pure function of
    its arguments. Each split has its own generator, so one split's size or noise leaves the others unchanged."""
    items = make_items(random.Random(seed), n_items)
    out = {}
    for name, (n, eps) in splits.items():
        rng = random.Random(f"{seed}-{name}")
        out[name] = [make_question(rng, items, eps, f"{name}-{i}") for i in range(n)]
    return items, out


def prompt_text(record: dict) -> str:
    """The prompt `first_kd.data` renders for a record with the default MCQA template (tokenizer training)."""
    options = "\n".join(f"{L}. {t}" for L, t in zip(LETTERS, record["choices"]))
    return f"Question: {record['question']}\n{options}\nAnswer:"


def bayes_reference(records: list[dict], eps: float, n_bins: int = 10) -> dict:
    """Metrics of the Bayes-optimal model on `records`: it puts 1 - eps on the true answer and eps / 4
    on each other option. Its accuracy against the noisy labels is about 1 - eps and its ECE about 0."""
    import numpy as np

    probs = np.full((len(records), N_OPTIONS), eps / (N_OPTIONS - 1))
    for i, r in enumerate(records):
        probs[i, LETTERS.index(r["true_answer"])] = 1.0 - eps
    labels = np.array([LETTERS.index(r["answer"]) for r in records])
    summary = metrics.calibration_summary(probs, labels, n_bins)
    return {k: float(summary[k]) if k != "n" else int(summary[k])
            for k in metrics.MODEL_SUMMARY_KEYS if k in summary}



# ----------------------------------------------------------------------------------------------
# The pipeline: each step is one public command
# ----------------------------------------------------------------------------------------------


def pipeline(cfg, lay: Layout) -> list[Step]:
    """The demo's commands, in order (argv for first_kd.cli.main, without the program name)."""
    # Paths are kept as the user gave --out (relative stays relative), so commands.sh works from the same directory.
    teacher_model = lay.runs / "teacher" / "model"
    steps = [teacher_step(cfg, lay, "fine-tune the teacher on its own split until it is accurate and near-certain "
                                    "(over-confident on the noisy benchmark)")]
    for split in ("train", "val", "test"):
        steps.append(Step(
            f"cache {split}", ["cache", "--teacher", str(teacher_model), "--data", str(lay.split(split)),
                               "--out", str(lay.store(split)), "--k", str(cfg.k)],
            lambda s=split: store_complete(lay.store(s)),
            f"the teacher's top-{cfg.k} on the {split} questions"))
    steps.append(Step(
        "calibrate", ["calibrate", "--store", str(lay.store("train")), "--val-store", str(lay.store("val")),
                      "--form", cfg.form],
        lambda: calibrated_from(lay.store("train"), lay.store("val")),
        "fit the temperature on val; recorded in the train store, which `distill --loss first` reads"))
    steps.append(Step(
        "calibrate test", ["calibrate", "--store", str(lay.store("test")), "--val-store", str(lay.store("val")),
                           "--form", cfg.form],
        lambda: calibrated_from(lay.store("test"), lay.store("val")),
        "the same fit (deterministic, on val again) recorded in the test store, for `evaluate --store`"))
    for name, (loss, extra, what) in STUDENTS.items():
        # Validation on val every tenth of the budget only logs (nothing is selected with it): the curves
        # show when each student's calibration is won or lost.
        if loss == "ce":
            source = ["--data", str(lay.split("train")), "--val-data", str(lay.split("val"))]
        else:
            source = ["--store", str(lay.store("train")), "--val-store", str(lay.store("val"))]
        steps.append(Step(
            f"student {name}", ["distill", "--student", str(lay.models / "student-init"), *source, "--loss", loss,
                                *extra, "--out", str(lay.runs / f"student_{name}"), "--max-steps",
                                str(cfg.student_steps), "--lr", str(cfg.student_lr), "--batch-size",
                                str(cfg.batch_size), "--schedule", cfg.schedule, "--seed", str(cfg.seed),
                                "--save-every", "0", "--eval-every", str(max(1, cfg.student_steps // 10))],
            lambda s=name: (lay.runs / f"student_{s}" / "summary.json").is_file(), what))
    for label, temperature in (("teacher", False), ("teacher_ts", True)):
        steps.append(Step(
            f"evaluate {label}", ["evaluate", "--store", str(lay.store("test")),
                                  "--temperature" if temperature else "--no-temperature",
                                  "--label", label, "--out", str(lay.evals / label)],
            lambda s=label: (lay.evals / s / "metrics.json").is_file(),
            "the teacher on the test questions from its cached top-k, "
            + ("with the temperature" if temperature else "raw")))
    for loss in STUDENT_LOSSES:
        label = f"student_{loss}"
        steps.append(Step(
            f"evaluate {label}", ["evaluate", "--model", str(lay.runs / label / "model"), "--data",
                                  str(lay.split("test")), "--label", label, "--out", str(lay.evals / label)],
            lambda s=label: (lay.evals / s / "metrics.json").is_file(),
            f"{label} on the test questions"))
    steps.append(Step(
        "report", ["report", ",".join(str(lay.evals / m) for m in MODEL_LABELS), "--labels", ",".join(MODEL_LABELS),
                   "--title", f"first-kd demo (seed {cfg.seed})", "--out", str(lay.root)],
        lambda: False,  # cheap, and it must reflect the evaluations present now
        "collect the evaluations into report.md / report.json / reliability.png"))
    return steps



# ----------------------------------------------------------------------------------------------
# Building the inputs (no command exists for these: they are the demo's own)
# ----------------------------------------------------------------------------------------------


def split_plan(cfg) -> dict[str, tuple[int, float]]:
    """{split: (size, label noise)}: the students' and held-out splits carry eps, the teacher's own teacher_eps."""
    return {"teacher": (cfg.n_teacher, cfg.teacher_eps), "train": (cfg.n_train, cfg.eps),
            "val": (cfg.n_val, cfg.eps), "test": (cfg.n_test, cfg.eps)}


def build_data(cfg, lay: Layout) -> dict[str, list[dict]]:
    items, splits = make_splits(cfg.seed, cfg.n_items, split_plan(cfg))
    lay.data.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        if not lay.split(name).is_file():
            write_jsonl(lay.split(name), rows)
    world = lay.data / "world.json"
    if not world.is_file():
        world.write_text(json.dumps({"items_lightest_first": items, "question": QUESTION,
                                     "splits": {k: {"n": n, "eps": e} for k, (n, e) in split_plan(cfg).items()}},
                                    indent=2))
    return splits


def build_models(cfg, lay: Layout, splits: dict[str, list[dict]]) -> None:
    """Tokenizer (trained on the teacher and train prompts + answers) and the two untrained models."""
    from first_kd.tiny import build_llama, train_tokenizer

    teacher_dir, student_dir = lay.models / "teacher-init", lay.models / "student-init"
    if (teacher_dir / "config.json").is_file() and (student_dir / "config.json").is_file():
        return
    texts = [prompt_text(r) + " " + r["answer"] for split in ("teacher", "train") for r in splits[split]]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    for letter in LETTERS:
        if len(tokenizer.encode(" " + letter, add_special_tokens=False)) != 1:
            raise FirstKDError(f"the tokenizer splits ' {letter}' into several tokens: raise --vocab-size "
                               f"(now {cfg.vocab_size})")
    # max_position_embeddings: the prompts are ~30 tokens; 128 leaves room for longer made-up names.
    build_llama(teacher_dir, tokenizer, hidden_size=cfg.teacher_hidden, num_layers=cfg.teacher_layers,
                num_heads=cfg.heads, max_position_embeddings=128, seed=cfg.seed)
    build_llama(student_dir, tokenizer, hidden_size=cfg.student_hidden, num_layers=cfg.student_layers,
                num_heads=cfg.heads, max_position_embeddings=128, seed=cfg.seed + 1)


# ----------------------------------------------------------------------------------------------
# Validation curves of the students


def read_curves(lay: Layout) -> dict[str, list[dict]]:
    """{student label: [{"step", "accuracy", "ece", "mean_confidence"}, ...]} from the runs' metrics.jsonl
    (the answer-level validation `distill` logs on the val split)."""
    curves = {}
    for loss in STUDENT_LOSSES:
        path = lay.runs / f"student_{loss}" / "metrics.jsonl"
        points = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            record = json.loads(line)
            if "val_ece" in record:
                points.append({"step": record["step"], "accuracy": record["val_accuracy"], "ece": record["val_ece"],
                               "mean_confidence": record["val_mean_confidence"]})
        curves[f"student_{loss}"] = points
    return curves


def save_curves_figure(curves: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Validation ECE, accuracy and mean confidence of each student against training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for label, points in curves.items():
        if not points:
            continue
        steps = [p["step"] for p in points]
        for ax, key in zip(axes, ("ece", "accuracy", "mean_confidence")):
            ax.plot(steps, [p[key] for p in points], marker="o", markersize=3, label=label)
    for ax, name in zip(axes, ("ECE (val)", "accuracy (val)", "mean confidence (val)")):
        ax.set_xlabel("optimizer step")
        ax.set_title(name, fontsize=10)
        ax.grid(True, linestyle=":", linewidth=0.5)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Checks and summary
# ----------------------------------------------------------------------------------------------


def claims(models: dict, store: dict) -> list[dict]:
    """What the demo is meant to show, each with its measured value and whether it holds."""
    t, ts = models["teacher"], models["teacher_ts"]
    ce, first = models["student_ce"], models["student_first"]
    # The students as language models: their own next-token probabilities, not renormalised over the options.
    ce_full, first_full = ce.get("full_vocabulary") or {}, first.get("full_vocabulary") or {}
    return [
        {"claim": "teacher ECE before temperature >= 0.10", "value": t["ece"], "ok": t["ece"] >= 0.10},
        {"claim": "teacher ECE after temperature <= 0.05", "value": ts["ece"], "ok": ts["ece"] <= 0.05},
        {"claim": "teacher accuracy change from the temperature == 0",
         "value": ts["accuracy"] - t["accuracy"], "ok": abs(ts["accuracy"] - t["accuracy"]) < 1e-9},
        {"claim": "student_first ECE / student_ce ECE <= 0.5", "value": first["ece"] / max(ce["ece"], 1e-12),
         "ok": first["ece"] <= 0.5 * ce["ece"]},
        {"claim": "student_first accuracy - student_ce accuracy >= -0.01",
         "value": first["accuracy"] - ce["accuracy"], "ok": first["accuracy"] >= ce["accuracy"] - 0.01},
        {"claim": "student_first full-vocabulary mass on the options >= 0.9",
         "value": first_full.get("mean_options_mass", 0.0), "ok": first_full.get("mean_options_mass", 0.0) >= 0.9},
        {"claim": "student_first full-vocabulary ECE / student_ce full-vocabulary ECE <= 0.5",
         "value": (first_full.get("ece") or 0) / max(ce_full.get("ece") or 0, 1e-12),
         "ok": bool(first_full) and bool(ce_full) and first_full["ece"] <= 0.5 * ce_full["ece"]},
        {"claim": "training store bytes per target position (top-k payload) <= 16",
         "value": store["bytes_per_position"], "ok": store["bytes_per_position"] <= 16},
    ]


def demo_markdown(report: dict) -> str:
    """The section the demo appends to the report's report.md: reference, checks, store, curves, time."""
    cfg, bayes, store = report["demo"], report["bayes_optimal"], report["store"]
    lines = [
        "## The demo", "",
        f"Task: which of five made-up objects is heaviest, in a world of {cfg['n_items']} objects with a hidden "
        f"weight order; every benchmark label (train, val, test) is replaced by a random wrong option with "
        f"probability {cfg['eps']:g}, the teacher's own split with probability {cfg['teacher_eps']:g}. The "
        f"Bayes-optimal model answers with the rule and says {1 - cfg['eps']:.2f}: on these "
        f"{bayes['n']:,} test questions it scores accuracy {bayes['accuracy']:.4f}, ECE {bayes['ece']:.4f}, "
        f"Brier {bayes['brier']:.4f}, NLL {bayes['nll']:.4f}. See first_kd/demo/calibration.py for why this is a fair test.",
        "",
        *checks_table(report["checks"]),
        "",
        f"Training store: {store['n_positions']:,} target positions, {store['bytes_per_position']:.2f} bytes per "
        f"position for the top-{store['k']} payload ({store['bytes_per_position_total']:.2f} with the prompts), "
        f"mean top-{store['k']} mass {store['mean_topk_mass']:.4f}.",
        "",
        "The students on the val split while training (logged by `distill`, nothing selected with it):", "",
        "![Students during training](training.png)", "",
        f"Wall time {report['wall_seconds']:.0f} s (per step in report.json `timings`); every command is in "
        "[commands.sh](commands.sh).", "",
    ]
    return "\n".join(lines)


def summary_text(report: dict) -> str:
    """What the demo prints at the end: each model's scores, the temperature, the store and the checks."""
    scores = [k for k in metrics.MODEL_SUMMARY_KEYS if k != "n"]
    rows = [("model", *(SCORE_HEADINGS.get(k, k) for k in scores))]
    for label in MODEL_LABELS + ("bayes_optimal",):
        m = report["models"].get(label) or report.get(label)
        if not m:
            continue
        rows.append((label, *(f"{m[k]:.4f}" if m.get(k) is not None else "n/a" for k in scores)))
    lines = ["", f"first-kd demo: {report['title']} -> {report['out']}", *text_table(rows)]
    t = report["temperature"]
    store = report["store"]
    symbol = "c" if t.get("form") == "prob" else "T"
    lines.append(f"  temperature {t.get('form')} {symbol} = {t.get('value', float('nan')):.4g} (fitted on val); "
                 f"test n = {report['models']['teacher']['n']:,} questions")
    lines.append(f"  training store: {store['bytes_per_position']:.2f} bytes/position (top-{store['k']}), "
                 f"mean top-{store['k']} mass {store['mean_topk_mass']:.4f}")
    lines += check_lines(report["checks"])
    lines.append(where_line(report) + f", students' val curves in {Path(report['out']) / 'training.png'}")
    return "\n".join(lines)


def run(cfg) -> int:
    """`first-kd demo --suite calibration` with a resolved DemoConfig (first_kd.demo.main)."""
    from first_kd.store import verify

    lay = Layout(cfg.out)

    def setup() -> dict[str, list[dict]]:
        splits = build_data(cfg, lay)
        build_models(cfg, lay, splits)
        return splits

    splits, timings = run_steps(cfg, lay, pipeline(cfg, lay), setup)

    report = read_json(lay.root / "report.json")
    # The report command keeps {label: record}; the demo has one fitted record, so it is given as such.
    report["temperature"] = store_temperature(lay.store("train"))
    report["store"] = verify(lay.store("train"))
    report.update(run_facts(cfg, lay, timings))
    report["bayes_optimal"] = bayes_reference(splits["test"], cfg.eps)
    report["checks"] = claims(report["models"], report["store"])
    report["val_curves"] = read_curves(lay)
    save_curves_figure(report["val_curves"], lay.root / "training.png",
                       f"students on the val split during training (seed {cfg.seed})")
    return finish(lay, report, demo_markdown(report), summary_text(report))
