"""`first-kd demo --suite reasoning`: teacher-written targets on a task built here, on a CPU.

The task: multi-digit addition with carries
-------------------------------------------
"Question: 152+269\\nAnswer: Let's think step by step." The teacher's trace works from the rightmost
digit, one step per line, and ends with the answer:

    2+9+0=11 write 1 carry 1
    5+6+1=12 write 2 carry 1
    1+2+1=4 write 4 carry 0
    #### 421

Why this task: the answer's leading digit depends on the carries out of every lower digit. A small
model that answers directly must do that whole chain inside one forward pass per digit, most significant
first; with the trace every step is a lookup over three digits that are written right before it. The
trace can be generated exactly, so the teacher's data is correct by construction and every rationale can
be checked. Digits are single tokens (first_kd.tiny.train_tokenizer(split_digits=True)), as with Llama
and Qwen tokenizers.

Splits (DIR/data): `teacher` (prompt + full trace: the teacher's fine-tuning data), `val` (prompt + full
trace of held-out problems: where the temperature is fitted), `train` and `test` (question + gold answer),
and `answers` (the train questions with the gold answer as the whole response, no cue: the answers-only
baseline's data). No problem is in two splits.

The story, every step a public command (DIR/commands.sh)
--------------------------------------------------------
1. `distill --loss ce` fine-tunes the teacher on full traces;
2. `generate`: the teacher writes `samples` rationales per train question, sampled at
   `sample_temperature` (hot enough that some go wrong, so the filters have work);
3. `filter --method finetune-cot`: keep the rationales whose answer is the gold one, up to
   `max_per_question` diverse ones per question (Fine-tune-CoT);
   `filter --method self-consistency --final-answer-only`: the same samples as if unlabelled, a question
   kept when `agreement` of its samples give the majority answer (System-2 distillation); its report
   compares the accuracy of the kept pseudo-labels with that of all of them;
4. `cache` the teacher's top-k over the kept rationales and over the val traces, and `calibrate` on val:
   token-level distillation over sequence-level targets;
5. three students from one initialisation and budget (student_dual: the budget times the number of
   trace levels, since its data holds each rationale once per level):
   student_cot      `distill --loss first --other-bucket` on the cached top-k of the kept rationales.
                    The other bucket is needed for a student that generates: the renormalised top-k KL
                    alone never pushes down tokens outside the teacher's top-k, and a student trained
                    without it fits its rationales yet writes stray tokens (0.0-0.5 accuracy over four runs, against
                    1.0 in the runs that found this);
   student_answers  `distill --loss ce` on the gold answers alone (no rationale);
   student_dual     `distill --loss ce` on Dualformer variants of the kept rationales
                    (`--trace-levels`, materialised when the data is read): the full trace opened by
                    [slow] and the answer alone opened by [fast]; levels between 0 and 1 add traces with
                    steps dropped, also opened by [slow]. CE, not the teacher's top-k: the teacher never
                    saw a dropped step, so after a skip its top-k predicts the skipped step, not the
                    variant's next one (first_kd/data/traces.py).
                    The default levels are 0,1. On this task every step carries a digit and a carry, so
                    a student that learnt to skip steps skips them in slow mode too and loses accuracy.
                    Measured with seed 0: levels 0,0.5,1 gave slow-mode accuracy 0.81 after 800 steps and
                    0.876 after 1,600 (seed 1: 0.914 after 800), against 0.996 with 0,1 and 1.0 for the
                    teacher. Its slow traces were about 7% shorter (46-48 tokens against 50-51). Search
                    traces like Dualformer's, whose dropped parts are redundant, do not pay this price.
6. `evaluate --modes`: each model writes its own rationale greedily on the test questions; accuracy,
   ECE of the answer's probability, mean generated tokens, per mode for the dual student (slow and fast
   forced with the marker, auto = the marker drawn from the student's own probabilities, per question);
7. `report`, and the checks the suite is meant to show (report.md, report.json).
"""

from __future__ import annotations

import random

from first_kd import metrics
from first_kd.data.rationale import with_cue
from first_kd.data.traces import parse_levels
from first_kd.demo import runner
from first_kd.demo.runner import (Step, calibrated_from, check_lines, checks_table, finish_with_checks, read_json,
                                  require, run_steps, store_complete, teacher_step, text_table, where_line, write_jsonl)
from first_kd.errors import FirstKDError

CUE = "Let's think step by step."
QA_TEMPLATE = "Question: {question}\nAnswer:"
EXTRACTOR = "hashes"
# Room for the longest trace: digits + 1 lines of ~15 tokens, the answer line and the marker.
TOKENS_PER_STEP = 16
EVALUATED = ("teacher", "student_cot", "student_answers", "student_dual")
# What the results keep of each mode of an evaluation: the model summary (a model that writes its own
# answer has no NLL: first_kd.scoring.summarize_generation) and what generation adds.
MODE_KEYS = (*(k for k in metrics.MODEL_SUMMARY_KEYS if k != "nll"), "mean_generated_tokens", "no_answer_rate",
             "chosen_modes")
# A teacher trained too briefly (a CI-sized run) may get no sampled rationale right, or its samples may
# never agree: the filter then keeps nothing and the demo stops there, saying what to change. Other
# options are another run, so they need another --out.
FILTER_FAILED = ("if it kept nothing, the teacher's rationales were too rarely right{} for this budget: re-run "
                 "with a new --out and more --teacher-steps or --samples{}")
# The suite's values of the suite-dependent options of DemoConfig (first_kd.demo.main).
DEFAULTS = dict(digits=3, n_teacher=2000, n_train=4000, n_val=300, n_test=500, vocab_size=300, teacher_hidden=128,
                teacher_layers=4, student_hidden=96, student_layers=3, teacher_steps=700, teacher_lr=3e-3,
                student_steps=800, student_lr=3e-3, samples=4, sample_temperature=1.5, agreement=0.75,
                max_per_question=2, trace_levels="0,1")


def check_options(cfg) -> None:
    """The suite's own checks of a resolved DemoConfig (the shared ones are DemoConfig.validate's)."""
    checks = [
        (1 <= cfg.digits <= 9, f"--digits must be in 1..9; got {cfg.digits}"),
        (cfg.samples >= 1, f"--samples must be >= 1; got {cfg.samples}"),
        (cfg.sample_temperature > 0 or cfg.samples == 1, "--sample-temperature must be > 0 to draw several --samples"),
        (0.0 < cfg.agreement <= 1.0, f"--agreement must be in (0, 1]; got {cfg.agreement}"),
        (cfg.max_per_question >= 0, f"--max-per-question must be >= 0 (0 = no cap); got {cfg.max_per_question}"),
        (cfg.k >= 1, f"--k must be >= 1; got {cfg.k}"),
    ]
    require(checks)
    levels = parse_levels(cfg.trace_levels)
    if 0.0 not in levels or 1.0 not in levels:
        raise FirstKDError(f"--trace-levels {cfg.trace_levels} must include 0 (the full trace: slow mode) and "
                           f"1 (answer only: fast mode)")


# ----------------------------------------------------------------------------------------------
# The task: pure functions
# ----------------------------------------------------------------------------------------------


def addition_trace(a: int, b: int, digits: int) -> list[str]:
    """The steps of a + b, rightmost digit first, then the answer line "#### a+b"."""
    steps, carry = [], 0
    for x, y in zip(str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total} write {total % 10} carry {total // 10}")
        carry = total // 10
    return steps + [f"#### {a + b}"]


def question_prompt(question: str, cue: str = CUE) -> str:
    """The prompt `first-kd generate` / `evaluate` render for a question with the suite's template."""
    return with_cue(QA_TEMPLATE.format(question=question), cue)


def make_splits(seed: int, digits: int, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """{split: records}: `sizes[split]` distinct problems per split, no problem in two splits.

    The teacher split holds prompt/response records (full traces); the others question/answer records.
    """
    rng = random.Random(f"{seed}-addition-{digits}")
    low, high = 10 ** (digits - 1), 10 ** digits
    room = (high - low) ** 2
    if sum(sizes.values()) > room // 2:
        raise FirstKDError(f"{sum(sizes.values())} problems asked of {digits}-digit addition, which has {room}: "
                           f"raise --digits or lower the split sizes")
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, n in sizes.items():
        rows = []
        while len(rows) < n:
            a, b = rng.randrange(low, high), rng.randrange(low, high)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            rid, question = f"{name}-{len(rows)}", f"{a}+{b}"
            if name in ("teacher", "val"):
                rows.append({"id": rid, "prompt": question_prompt(question),
                             "response": "\n" + "\n".join(addition_trace(a, b, digits))})
            else:
                rows.append({"id": rid, "question": question, "answer": str(a + b)})
        out[name] = rows
    out["answers"] = [{"id": r["id"], "prompt": question_prompt(r["question"], cue=""),
                       "response": f" #### {r['answer']}"} for r in out["train"]]
    return out


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


class Layout(runner.Layout):
    """The shared layout plus the teacher's rationales and what the filters kept."""

    def __init__(self, out: str):
        super().__init__(out)
        self.generated = self.root / "generated"
        self.filtered = self.root / "filtered"


def pipeline(cfg, lay: Layout) -> list:
    teacher = lay.runs / "teacher" / "model"
    max_new = TOKENS_PER_STEP * (cfg.digits + 2)
    common_train = ["--lr", str(cfg.student_lr), "--batch-size", str(cfg.batch_size), "--schedule", cfg.schedule,
                    "--seed", str(cfg.seed), "--save-every", "0"]
    student_steps = ["--max-steps", str(cfg.student_steps)]
    # The dual student's data holds every rationale once per trace level; scaling its steps by the number
    # of levels shows it each full trace as often as student_cot sees it.
    dual_steps = ["--max-steps", str(cfg.student_steps * len(parse_levels(cfg.trace_levels)))]
    gen = lay.generated / "train.jsonl"
    cot = lay.filtered / "train_cot.jsonl"
    # The temperature is fitted on exact traces of held-out problems: how sure the teacher should be
    # of each token of a correct rationale it has not seen.
    cache_data = {"train": cot, "val": lay.split("val")}
    store = {"train": lay.store("train"), "val": lay.store("val")}
    sc = lay.filtered / "train_sc.jsonl"
    steps = [teacher_step(cfg, lay, "fine-tune the teacher on full addition traces")]
    sampling = ["--samples", str(cfg.samples)] + (["--temperature", str(cfg.sample_temperature)]
                                                  if cfg.samples > 1 else [])
    steps.append(Step(
        "generate", ["generate", "--teacher", str(teacher), "--data", str(lay.split("train")), "--out", str(gen),
                     *sampling, "--extractor", EXTRACTOR, "--max-new-tokens", str(max_new), "--batch-size", "32",
                     "--seed", str(cfg.seed)],
        lambda: gen.is_file(),
        f"the teacher writes {cfg.samples} rationale(s) per train question"
        + (f", sampled at temperature {cfg.sample_temperature:g}" if cfg.samples > 1 else " (greedy)")))
    steps.append(Step(
        "filter cot", ["filter", str(gen), "--method", "finetune-cot", "--max-per-question",
                       str(cfg.max_per_question), "--out", str(cot)],
        lambda: cot.is_file(),
        f"Fine-tune-CoT: keep rationales whose answer is the gold one, up to {cfg.max_per_question} diverse ones "
        "per question", on_failure=FILTER_FAILED.format("", "")))
    steps.append(Step(
        "filter self-consistency", ["filter", str(gen), "--method", "self-consistency", "--threshold",
                                    str(cfg.agreement), "--final-answer-only", "--out", str(sc)],
        lambda: sc.is_file(),
        "System-2 distillation on the same samples as if unlabelled: majority answer, kept when "
        f"{cfg.agreement:g} of the samples agree (its report scores the pseudo-labels against the gold ones)",
        on_failure=FILTER_FAILED.format(" or agreed", ", or a lower --agreement")))
    for split in ("train", "val"):
        steps.append(Step(
            f"cache {split}", ["cache", "--teacher", str(teacher), "--data", str(cache_data[split]), "--out",
                               str(store[split]), "--k", str(cfg.k)],
            lambda s=split: store_complete(store[s]),
            f"the teacher's top-{cfg.k} over " + ("the kept train rationales" if split == "train"
                                                  else "exact traces of the val problems")))
    steps.append(Step(
        "calibrate", ["calibrate", "--store", str(store["train"]), "--val-store", str(store["val"]), "--form", cfg.form],
        lambda: calibrated_from(store["train"], store["val"]),
        "fit the temperature on the val traces; recorded in the train store"))
    steps.append(Step(
        "student cot", ["distill", "--student", str(lay.models / "student-init"), "--store", str(store["train"]),
                        "--loss", "first", "--other-bucket", "--out", str(lay.runs / "student_cot"), *common_train,
                        *student_steps],
        lambda: (lay.runs / "student_cot" / "summary.json").is_file(),
        "student distilled from the teacher's calibrated top-k over its filtered rationales; the other bucket "
        "makes it push down every token outside the top-k, which a student that generates needs"))
    steps.append(Step(
        "student answers", ["distill", "--student", str(lay.models / "student-init"), "--data",
                            str(lay.split("answers")), "--loss", "ce", "--out", str(lay.runs / "student_answers"),
                            *common_train, *student_steps],
        lambda: (lay.runs / "student_answers" / "summary.json").is_file(),
        "baseline: student fine-tuned on the gold answers alone"))
    steps.append(Step(
        "student dual", ["distill", "--student", str(lay.models / "student-init"), "--data", str(cot),
                         "--trace-levels", cfg.trace_levels, "--trace-seed", str(cfg.seed), "--loss", "ce",
                         "--out", str(lay.runs / "student_dual"), *common_train, *dual_steps],
        lambda: (lay.runs / "student_dual" / "summary.json").is_file(),
        f"Dualformer: student fine-tuned on trace variants (drop levels {cfg.trace_levels}) opened by [slow] / [fast]"))
    models = {"teacher": teacher, "student_cot": lay.runs / "student_cot" / "model",
              "student_answers": lay.runs / "student_answers" / "model",
              "student_dual": lay.runs / "student_dual" / "model"}
    for label, model in models.items():
        modes = "slow,fast,auto" if label == "student_dual" else "auto"
        cue = ["--cue", ""] if label == "student_answers" else []
        steps.append(Step(
            f"evaluate {label}", ["evaluate", "--model", str(model), "--data", str(lay.split("test")), "--modes",
                                  modes, *cue, "--extractor", EXTRACTOR, "--max-new-tokens", str(max_new),
                                  "--label", label, "--out", str(lay.evals / label)],
            lambda s=label: (lay.evals / s / "metrics.json").is_file(),
            f"{label} answers the test questions (greedy), modes {modes}"))
    steps.append(Step(
        "report", ["report", ",".join(str(lay.evals / m) for m in EVALUATED), "--labels", ",".join(EVALUATED),
                   "--title", f"first-kd reasoning demo (seed {cfg.seed})", "--out", str(lay.root)],
        lambda: False,
        "collect the evaluations into report.md / report.json / reliability.png"))
    return steps


def build_inputs(cfg, lay: Layout) -> dict[str, list[dict]]:
    """Data splits, a digit-splitting tokenizer and the two untrained models (skipped when present)."""
    from first_kd.tiny import build_llama, train_tokenizer

    sizes = {"teacher": cfg.n_teacher, "train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    splits = make_splits(cfg.seed, cfg.digits, sizes)
    lay.data.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        if not lay.split(name).is_file():
            write_jsonl(lay.split(name), rows)
    teacher_dir, student_dir = lay.models / "teacher-init", lay.models / "student-init"
    if (teacher_dir / "config.json").is_file() and (student_dir / "config.json").is_file():
        return splits
    # The markers and the answers-only layout are in the corpus so they get tokens of their own.
    texts = ([r["prompt"] + r["response"] for r in splits["teacher"]]
             + [r["prompt"] + r["response"] for r in splits["answers"]] + ["[slow]\n[fast]\n"] * 100)
    tokenizer = train_tokenizer(texts, cfg.vocab_size, split_digits=True)
    positions = 64 + TOKENS_PER_STEP * (cfg.digits + 2)
    build_llama(teacher_dir, tokenizer, hidden_size=cfg.teacher_hidden, num_layers=cfg.teacher_layers,
                num_heads=cfg.heads, max_position_embeddings=positions, seed=cfg.seed)
    build_llama(student_dir, tokenizer, hidden_size=cfg.student_hidden, num_layers=cfg.student_layers,
                num_heads=cfg.heads, max_position_embeddings=positions, seed=cfg.seed + 1)
    return splits


# ----------------------------------------------------------------------------------------------
# Results and checks
# ----------------------------------------------------------------------------------------------


def collect(lay: Layout) -> dict:
    """Per model and mode: accuracy, ECE, mean generated tokens ...; the filters' reports."""
    models = {}
    for label in EVALUATED:
        metrics = read_json(lay.evals / label / "metrics.json")
        models[label] = {mode: {k: m.get(k) for k in MODE_KEYS if k in m}
                         for mode, m in (metrics.get("modes") or {}).items()}
    filters = {name: read_json(lay.filtered / f"{name}.filter.json") for name in ("train_cot", "train_sc")}
    generated = read_json(lay.generated / "train.meta.json").get("counts", {})
    return {"models": models, "filters": filters, "generated": generated}


def claims(results: dict) -> list[dict]:
    """What the suite is meant to show, each with its measured value and whether it holds."""
    m = results["models"]
    teacher, cot, answers = m["teacher"]["auto"], m["student_cot"]["auto"], m["student_answers"]["auto"]
    slow, fast = m["student_dual"]["slow"], m["student_dual"]["fast"]
    pseudo = results["filters"]["train_sc"].get("pseudo_labels") or {}
    kept, every = pseudo.get("accuracy_kept"), pseudo.get("accuracy_all")
    return [
        {"claim": "student_cot accuracy - student_answers accuracy >= 0.20",
         "value": cot["accuracy"] - answers["accuracy"], "ok": cot["accuracy"] - answers["accuracy"] >= 0.20},
        {"claim": "self-consistency: accuracy of kept pseudo-labels - accuracy of all pseudo-labels >= 0",
         "value": (kept - every) if kept is not None and every is not None else float("nan"),
         "ok": kept is not None and every is not None and kept >= every},
        {"claim": "student_dual: fast mean tokens / slow mean tokens <= 0.20",
         "value": fast["mean_generated_tokens"] / max(slow["mean_generated_tokens"], 1e-9),
         "ok": fast["mean_generated_tokens"] <= 0.20 * slow["mean_generated_tokens"]},
        {"claim": "student_dual: teacher accuracy - slow accuracy <= 0.02",
         "value": teacher["accuracy"] - slow["accuracy"], "ok": teacher["accuracy"] - slow["accuracy"] <= 0.02},
    ]


def _row(label: str, mode: str, r: dict) -> str:
    def f(key, fmt="{:.4f}"):
        return fmt.format(r[key]) if r.get(key) is not None else "n/a"

    return (f"| {label} | {mode} | {f('accuracy')} | {f('ece')} | {f('mean_confidence')} | "
            f"{f('mean_generated_tokens', '{:.1f}')} | {f('no_answer_rate')} |")


def demo_markdown(report: dict) -> str:
    cfg, results = report["demo"], report["results"]
    lines = [
        "## The reasoning demo", "",
        f"Task: {cfg['digits']}-digit addition with carries; the teacher writes one line per digit and ends with "
        f"'#### answer'. See first_kd/demo/reasoning.py for why the trace helps.", "",
        "| model | mode | accuracy | ECE | mean conf. | mean tokens | no answer |",
        "|:---|:---|---:|---:|---:|---:|---:|",
    ]
    for label, modes in results["models"].items():
        for mode, r in modes.items():
            lines.append(_row(label, mode, r))
    auto = results["models"]["student_dual"].get("auto", {}).get("chosen_modes")
    if auto:
        lines += ["", "student_dual in auto mode chose: " + ", ".join(f"{k} {v:.1%}" for k, v in auto.items())]
    lines += ["", "Filters (counts of samples):", ""]
    for name, rep in results["filters"].items():
        if rep:
            lines.append(f"- {name}: {rep.get('method')}, kept {rep.get('records_kept')}/{rep.get('records_in')} "
                         f"samples of {rep.get('questions_kept')}/{rep.get('questions_in')} questions")
    generated = results.get("generated") or {}
    if generated.get("accuracy") is not None:
        lines.append(f"- the teacher's samples: {generated['samples']:,} rationales for {generated['questions']:,} "
                     f"questions at temperature {cfg['sample_temperature']:g}, accuracy {generated['accuracy']:.4f} "
                     f"per sample")
    pseudo = results["filters"]["train_sc"].get("pseudo_labels")
    if pseudo:
        lines.append(f"- self-consistency pseudo-labels: accuracy {pseudo['accuracy_kept']:.4f} over the "
                     f"{pseudo['n_kept']} kept questions vs {pseudo['accuracy_all']:.4f} over all {pseudo['n_all']}")
    lines += ["", *checks_table(report["checks"]),
              "", f"Wall time {report['wall_seconds']:.0f} s; every command is in [commands.sh](commands.sh).", ""]
    return "\n".join(lines)


def summary_text(report: dict) -> str:
    lines = ["", f"first-kd demo --suite reasoning: {report['title']} -> {report['out']}"]
    rows = [("model", "mode", "accuracy", "ECE", "mean tokens")]
    for label, modes in report["results"]["models"].items():
        for mode, r in modes.items():
            rows.append((label, mode, *(f"{r[k]:.4f}" if r.get(k) is not None else "n/a" for k in ("accuracy", "ece")),
                         f"{r['mean_generated_tokens']:.1f}" if r.get("mean_generated_tokens") is not None else "n/a"))
    lines += text_table(rows, left=2)
    generated = report["results"].get("generated") or {}
    if generated.get("accuracy") is not None:
        lines.append(f"  teacher samples: accuracy {generated['accuracy']:.4f} per sample ({generated['samples']:,})")
    pseudo = report["results"]["filters"]["train_sc"].get("pseudo_labels")
    if pseudo:
        lines.append(f"  self-consistency pseudo-labels: {pseudo['accuracy_kept']:.4f} kept ({pseudo['n_kept']}) vs "
                     f"{pseudo['accuracy_all']:.4f} all ({pseudo['n_all']})")
    lines += check_lines(report["checks"])
    lines.append(where_line(report))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def run(cfg) -> int:
    """`first-kd demo --suite reasoning` with a resolved DemoConfig (first_kd.demo.main)."""
    lay = Layout(cfg.out)
    _, timings = run_steps(cfg, lay, pipeline(cfg, lay), lambda: build_inputs(cfg, lay))
    return finish_with_checks(cfg, lay, timings, collect(lay), claims, demo_markdown, summary_text)
