"""`first-kd demo --suite system2`: System-2 distillation (Yu et al. 2024) on a coin-flip task built here.

The task: coin flip (one of the paper's tasks)
----------------------------------------------
"A coin is heads up. Ann flips the coin. Bob does not flip the coin. Cy flips the coin. Is the coin still
heads up?" with `people` distinct names from a fixed list, each flipping or not at random. The answer,
"yes" or "no", is the parity of the flips.

System 1 is the teacher answering from the question alone (" The answer is no."). System 2 is the same
teacher running the built-in 1-step Rephrase-and-Respond program (configs/programs/rar-1step.yaml: the
question followed by "Rephrase and expand the question, and respond."), which it was taught to answer by
rephrasing the question as the coin's side after each person, then answering:

    Rephrased: the coin starts heads up; Ann flips it: tails; Bob does not: tails; Cy flips it: heads.
    Is it still heads up? It ends heads up, so yes. The answer is yes.

Why the program makes the difference: the direct answer is the parity of `people` bits spread over the
question, which a small model must compute inside the forward pass of one token; parity is the textbook
function gradient descent finds slowly: a small model sits at chance for hundreds of steps before it finds
it, if it does within its budget (measured over three seeds: docs/demo-system2-results.md). In the rephrasing every side is the previous side, written just before, flipped or not by
one sentence of the question: a lookup, the same reason the reasoning suite's trace helps with carries. The
program's output is longer, which is the cost System-2 distillation removes.

Why the teacher is taught the direct answer on only `direct_share` (10%) of its questions: System 2 must be
what the teacher can do and System 1 the route it was barely shown, as for the paper's LLMs, never trained
on coin flips. A first version taught every question both ways; whether the teacher then found parity for
its direct answers by itself was a matter of seed (0.64 / 0.93 / 0.78 over seeds 0-2), so on seed 1 the
program added little. With 200 direct examples the teacher's direct answers are at chance on every seed
(0.48-0.53), its program answers 1.000.

Splits (DIR/data): `teacher` (every question in the program's prompt with the rephrased answer, and one in
ten of them also bare with the direct answer, just before: the teacher's fine-tuning data), `train` (questions the
teacher labels with the program; their gold answers are read only by the reports, never by a filter or a
model) and `test` (question + gold answer). No question is in two splits.

The story, every step a public command (DIR/commands.sh)
--------------------------------------------------------
1. `distill --loss ce` fine-tunes the teacher on the mixture;
2. `evaluate --modes auto --cue '' --qa-template '{question}'`: the teacher answers the test questions
   directly (System 1), greedy;
3. `generate --program rar-1step --samples 1 --temperature 0`: the teacher answers them through the program
   (System 2), greedy; accuracy and mean tokens (every stage's, eos included) come from its counts;
4. `generate --program rar-1step`: `samples` program runs per train question, sampled at
   `sample_temperature`;
5. `filter --method self-consistency --final-answer-only`: a question is kept when `agreement` of its samples
   give the majority answer, as the bare question (the program's student prompt) -> " The answer is X." (the
   paper's unsupervised consistency filter; the rephrasings are dropped);
6. `distill --loss ce` trains the student from its initialisation on the kept pairs;
7. `evaluate` the student as in 2 (it answers directly: System 1 cost);
8. the control, so that the program is the only difference: `generate` without the program (the teacher
   answering each bare train question, `samples` times at `sample_temperature`), the same filter, the same
   student initialisation and budget (student_s1), evaluated the same way;
9. `report`, and the checks the suite is meant to show (report.md, report.json).

The students see more direct-answer training than the teacher did (the teacher's budget is split with the
rephrasings), so student above teacher_direct alone would not show that the program's labels matter;
student against student_s1 does.
"""

from __future__ import annotations

import random
from pathlib import Path

from first_kd import programs
from first_kd.demo import runner
from first_kd.demo.runner import (Step, check_lines, checks_table, finish_with_checks, read_json, require, run_steps,
                                  teacher_step, text_table, where_line, write_jsonl)
from first_kd.errors import FirstKDError

PROGRAM = "rar-1step"
EXTRACTOR = "answer-is"
ANSWER = " The answer is {answer}."
NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jo", "Kim", "Lou", "Max", "Ned", "Olga",
         "Pam", "Quin", "Ray", "Sue", "Tom", "Uma", "Vic", "Wes", "Zoe")
# Room for the longest rephrasing: ~8 tokens per person, the opening and closing sentences.
TOKENS_PER_PERSON = 12
DIRECT_TOKENS = 12
EVALUATED = ("teacher_direct", "teacher_program", "student", "student_s1")
# The ones `evaluate` measures (the teacher's program runs are measured by `generate`'s counts).
DIRECT_EVALUATED = ("teacher_direct", "student", "student_s1")
FILTER_FAILED = ("if it kept nothing, the teacher's program runs too rarely agreed for this budget: re-run with a "
                 "new --out and more --teacher-steps or a lower --agreement")
# The suite's values of the suite-dependent options of DemoConfig (first_kd.demo.main).
DEFAULTS = dict(people=5, n_teacher=2000, n_train=2000, n_test=400, vocab_size=400, teacher_hidden=128,
                teacher_layers=4, student_hidden=96, student_layers=3, teacher_steps=600, teacher_lr=3e-3,
                direct_share=0.1, student_steps=1400, student_lr=3e-3, samples=4, sample_temperature=1.0, agreement=0.75)


def check_options(cfg) -> None:
    """The suite's own checks of a resolved DemoConfig (the shared ones are DemoConfig.validate's)."""
    require([
        (1 <= cfg.people <= len(NAMES), f"--people must be in 1..{len(NAMES)}; got {cfg.people}"),
        (cfg.samples >= 1, f"--samples must be >= 1; got {cfg.samples}"),
        (cfg.sample_temperature > 0 or cfg.samples == 1, "--sample-temperature must be > 0 to draw several --samples"),
        (0.0 < cfg.agreement <= 1.0, f"--agreement must be in (0, 1]; got {cfg.agreement}"),
        (0.0 < cfg.direct_share <= 1.0 and int(cfg.direct_share * cfg.n_teacher) >= 1,
         f"--direct-share must be in (0, 1] and leave at least one direct example in --n-teacher; got "
         f"{cfg.direct_share} of {cfg.n_teacher}"),
    ])


# ----------------------------------------------------------------------------------------------
# The task: pure functions
# ----------------------------------------------------------------------------------------------


def coin_question(names: list[str], flips: list[bool]) -> str:
    sentences = [f"{n} flips the coin." if f else f"{n} does not flip the coin." for n, f in zip(names, flips)]
    return " ".join(["A coin is heads up.", *sentences, "Is the coin still heads up?"])


def coin_answer(flips: list[bool]) -> str:
    return "no" if sum(flips) % 2 else "yes"


def rephrased(names: list[str], flips: list[bool]) -> str:
    """The program's response the teacher is taught: the coin's side after each person, then the answer."""
    side, steps = "heads", []
    for n, f in zip(names, flips):
        side = ("tails" if side == "heads" else "heads") if f else side
        steps.append(f"{n} flips it: {side}" if f else f"{n} does not: {side}")
    answer = coin_answer(flips)
    return (" Rephrased: the coin starts heads up; " + "; ".join(steps) + f". Is it still heads up? It ends {side} "
            f"up, so {answer}." + ANSWER.format(answer=answer))


def program_prompt(question: str) -> str:
    """The prompt the built-in program's (only) stage shows for `question`."""
    program = programs.load_program(PROGRAM)
    return programs.render(program.stages[0].template, {"question": question})


def make_splits(seed: int, people: int, sizes: dict[str, int], direct_share: float = 1.0) -> dict[str, list[dict]]:
    """{split: records}: `sizes[split]` distinct questions per split, no question in two splits. The teacher
    split holds, per question, the program's prompt/response record, preceded by the direct one (bare question
    -> answer) for a `direct_share` of them, spread evenly (every tenth at 0.1); the others hold question/answer records."""
    rng = random.Random(f"{seed}-coin-{people}")
    room = len(NAMES) ** people * 2 ** people
    if sum(sizes.values()) > room // 4:
        raise FirstKDError(f"{sum(sizes.values())} questions asked of {people} people, which allow few: raise "
                           f"--people or lower the split sizes")
    seen: set[str] = set()
    out = {}
    for name, n in sizes.items():
        rows, count = [], 0
        while count < n:
            names = rng.sample(NAMES, people)
            flips = [rng.random() < 0.5 for _ in range(people)]
            question = coin_question(names, flips)
            if question in seen:
                continue
            seen.add(question)
            rid, count = f"{name}-{count}", count + 1
            # spread evenly over the split: the training order may shuffle within windows only
            if name == "teacher" and int(count * direct_share) > int((count - 1) * direct_share):
                rows.append({"id": f"{rid}-direct", "prompt": question,
                             "response": ANSWER.format(answer=coin_answer(flips))})
            if name == "teacher":
                rows.append({"id": f"{rid}-program", "prompt": program_prompt(question),
                             "response": rephrased(names, flips)})
            else:
                rows.append({"id": rid, "question": question, "answer": coin_answer(flips)})
        out[name] = rows
    return out


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


class Layout(runner.Layout):
    """The shared layout plus the teacher's program runs and what the filter kept."""

    def __init__(self, out: str):
        super().__init__(out)
        self.generated = self.root / "generated"
        self.filtered = self.root / "filtered"


def evaluate_step(lay: Layout, label: str, model: Path, comment: str) -> Step:
    """A model answers the test questions directly (the bare question, no cue), greedy."""
    return Step(
        f"evaluate {label}", ["evaluate", "--model", str(model), "--data", str(lay.split("test")), "--modes", "auto",
                              "--cue", "", "--qa-template", "{question}", "--extractor", EXTRACTOR,
                              "--max-new-tokens", str(DIRECT_TOKENS), "--label", label, "--out",
                              str(lay.evals / label)],
        lambda: (lay.evals / label / "metrics.json").is_file(), comment)


def student_step(cfg, lay: Layout, label: str, data: Path, comment: str) -> Step:
    """`distill --loss ce`: a student from the shared initialisation fine-tuned on kept question -> answer pairs."""
    return Step(
        label.replace("_", " "), ["distill", "--student", str(lay.models / "student-init"), "--data", str(data),
                                  "--loss", "ce", "--out", str(lay.runs / label), "--max-steps", str(cfg.student_steps),
                                  "--lr", str(cfg.student_lr), "--batch-size", str(cfg.batch_size), "--schedule",
                                  cfg.schedule, "--seed", str(cfg.seed), "--save-every", "0"],
        lambda: (lay.runs / label / "summary.json").is_file(), comment)


def pipeline(cfg, lay: Layout) -> list:
    teacher = lay.runs / "teacher" / "model"
    max_new = TOKENS_PER_PERSON * (cfg.people + 2)
    program_test, gen = lay.generated / "test_program.jsonl", lay.generated / "train.jsonl"
    gen_direct = lay.generated / "train_direct.jsonl"
    kept, kept_direct = lay.filtered / "train_s2.jsonl", lay.filtered / "train_s1.jsonl"
    common = ["--extractor", EXTRACTOR, "--batch-size", "64", "--seed", str(cfg.seed)]
    program = ["--program", PROGRAM, "--max-new-tokens", str(max_new), *common]
    sampling = ["--samples", str(cfg.samples)] + (["--temperature", str(cfg.sample_temperature)]
                                                  if cfg.samples > 1 else [])
    drawn = (f"{cfg.samples} time(s) per train question" + (f", sampled at temperature {cfg.sample_temperature:g}"
                                                             if cfg.samples > 1 else " (greedy)"))
    consistent = ["--method", "self-consistency", "--threshold", str(cfg.agreement), "--final-answer-only"]
    return [
        teacher_step(cfg, lay, "fine-tune the teacher on direct answers and on the program's rephrasings"),
        evaluate_step(lay, "teacher_direct", teacher, "System 1: the teacher answers the bare test questions"),
        Step("teacher program", ["generate", "--teacher", str(teacher), "--data", str(lay.split("test")), "--out",
                                 str(program_test), "--samples", "1", "--temperature", "0", *program],
             lambda: program_test.is_file(),
             f"System 2: the teacher answers the test questions through the {PROGRAM} program (greedy)"),
        Step("generate", ["generate", "--teacher", str(teacher), "--data", str(lay.split("train")), "--out",
                          str(gen), *sampling, *program],
             lambda: gen.is_file(), f"the teacher runs the program {drawn}"),
        Step("filter", ["filter", str(gen), *consistent, "--out", str(kept)], lambda: kept.is_file(),
             f"System-2 distillation: keep a question when {cfg.agreement:g} of its program runs agree, as the bare "
             "question -> the majority answer (no gold answer is read)", on_failure=FILTER_FAILED),
        student_step(cfg, lay, "student", kept, "the student is fine-tuned on the kept question -> final answer pairs"),
        evaluate_step(lay, "student", lay.runs / "student" / "model", "the student answers the bare test questions"),
        # The control: the same pipeline with System 1 labels (the teacher answering the bare question), so
        # that the program is the only difference between the two students.
        Step("generate direct", ["generate", "--teacher", str(teacher), "--data", str(lay.split("train")), "--out",
                                 str(gen_direct), *sampling, "--cue", "", "--qa-template", "{question}",
                                 "--max-new-tokens", str(DIRECT_TOKENS), *common],
             lambda: gen_direct.is_file(), f"control: the teacher answers each bare train question {drawn}"),
        Step("filter direct", ["filter", str(gen_direct), *consistent, "--out", str(kept_direct)],
             lambda: kept_direct.is_file(), "control: the same filter over the System 1 answers",
             on_failure=FILTER_FAILED),
        student_step(cfg, lay, "student_s1", kept_direct,
                     "control: the same student fine-tuned on the kept System 1 answers"),
        evaluate_step(lay, "student_s1", lay.runs / "student_s1" / "model",
                      "the control student answers the bare test questions"),
        Step("report", ["report", ",".join(str(lay.evals / m) for m in DIRECT_EVALUATED), "--labels",
                        ",".join(DIRECT_EVALUATED), "--title", f"first-kd System-2 distillation demo (seed {cfg.seed})",
                        "--out", str(lay.root)],
             lambda: False, "collect the evaluations into report.md / report.json / reliability.png"),
    ]


def build_inputs(cfg, lay: Layout) -> dict[str, list[dict]]:
    """Data splits, a tokenizer and the two untrained models (skipped when present)."""
    from first_kd.tiny import build_llama, train_tokenizer

    sizes = {"teacher": cfg.n_teacher, "train": cfg.n_train, "test": cfg.n_test}
    splits = make_splits(cfg.seed, cfg.people, sizes, cfg.direct_share)
    lay.data.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        if not lay.split(name).is_file():
            write_jsonl(lay.split(name), rows)
    teacher_dir, student_dir = lay.models / "teacher-init", lay.models / "student-init"
    if (teacher_dir / "config.json").is_file() and (student_dir / "config.json").is_file():
        return splits
    tokenizer = train_tokenizer([r["prompt"] + r["response"] for r in splits["teacher"]], cfg.vocab_size)
    positions = 64 + 16 * cfg.people + TOKENS_PER_PERSON * (cfg.people + 2)
    build_llama(teacher_dir, tokenizer, hidden_size=cfg.teacher_hidden, num_layers=cfg.teacher_layers,
                num_heads=cfg.heads, max_position_embeddings=positions, seed=cfg.seed)
    build_llama(student_dir, tokenizer, hidden_size=cfg.student_hidden, num_layers=cfg.student_layers,
                num_heads=cfg.heads, max_position_embeddings=positions, seed=cfg.seed + 1)
    return splits


# ----------------------------------------------------------------------------------------------
# Results and checks
# ----------------------------------------------------------------------------------------------


def collect(lay: Layout) -> dict:
    """Accuracy and mean generated tokens of each way of answering; the filters' reports; the samples' counts."""
    models = {}
    for label in DIRECT_EVALUATED:
        auto = (read_json(lay.evals / label / "metrics.json").get("modes") or {}).get("auto", {})
        models[label] = {k: auto.get(k) for k in ("n", "accuracy", "mean_generated_tokens", "no_answer_rate")}
    counts = read_json(lay.generated / "test_program.meta.json").get("counts", {})
    n = counts.get("samples") or 0
    models["teacher_program"] = {"n": n, "accuracy": counts.get("accuracy"),
                                 "mean_generated_tokens": counts.get("mean_tokens"),
                                 "no_answer_rate": (1 - counts["answers_extracted"] / n) if n else None}
    return {"models": {label: models[label] for label in EVALUATED},
            "filter": read_json(lay.filtered / "train_s2.filter.json"),
            "filter_s1": read_json(lay.filtered / "train_s1.filter.json"),
            "generated": read_json(lay.generated / "train.meta.json").get("counts", {}),
            "generated_s1": read_json(lay.generated / "train_direct.meta.json").get("counts", {})}


def claims(results: dict) -> list[dict]:
    """What the suite is meant to show, each with its measured value and whether it holds."""
    m = results["models"]
    direct, program, student, s1 = m["teacher_direct"], m["teacher_program"], m["student"], m["student_s1"]
    return [
        {"claim": "teacher program accuracy - teacher direct accuracy >= 0.20",
         "value": program["accuracy"] - direct["accuracy"], "ok": program["accuracy"] - direct["accuracy"] >= 0.20},
        {"claim": "student accuracy - teacher direct accuracy >= 0.10",
         "value": student["accuracy"] - direct["accuracy"], "ok": student["accuracy"] - direct["accuracy"] >= 0.10},
        {"claim": "student accuracy - student_s1 accuracy >= 0.10",
         "value": student["accuracy"] - s1["accuracy"], "ok": student["accuracy"] - s1["accuracy"] >= 0.10},
        {"claim": "student mean tokens / teacher program mean tokens <= 0.25",
         "value": student["mean_generated_tokens"] / max(program["mean_generated_tokens"], 1e-9),
         "ok": student["mean_generated_tokens"] <= 0.25 * program["mean_generated_tokens"]},
    ]


def _fmt(value, fmt="{:.4f}") -> str:
    return fmt.format(value) if value is not None else "n/a"


def demo_markdown(report: dict) -> str:
    cfg, results = report["demo"], report["results"]
    lines = [
        "## The System-2 distillation demo", "",
        f"Task: coin flip with {cfg['people']} people; System 2 is the {PROGRAM} program. See "
        "first_kd/demo/system2.py for why the program helps.", "",
        "| model | accuracy | mean tokens | no answer |", "|:---|---:|---:|---:|",
        *[f"| {label} | {_fmt(r['accuracy'])} | {_fmt(r['mean_generated_tokens'], '{:.1f}')} | "
          f"{_fmt(r['no_answer_rate'])} |" for label, r in results["models"].items()], ""]
    for key, which in (("", "program runs (System 2)"), ("_s1", "direct answers (System 1, the control)")):
        rep, generated = results.get("filter" + key) or {}, results.get("generated" + key) or {}
        if generated.get("accuracy") is not None:
            lines.append(f"- the teacher's {which} on train: {generated['samples']:,} for "
                         f"{generated['questions']:,} questions at temperature {cfg['sample_temperature']:g}, "
                         f"accuracy {generated['accuracy']:.4f} per sample (gold read by this report only)")
        pseudo = rep.get("pseudo_labels")
        if pseudo:
            lines.append(f"- self-consistency over them kept {pseudo['n_kept']}/{pseudo['n_all']} questions; "
                         f"pseudo-label accuracy {pseudo['accuracy_kept']:.4f} kept vs "
                         f"{pseudo['accuracy_all']:.4f} all")
    lines += ["", *checks_table(report["checks"]),
              "", f"Wall time {report['wall_seconds']:.0f} s; every command is in [commands.sh](commands.sh).", ""]
    return "\n".join(lines)


def summary_text(report: dict) -> str:
    lines = ["", f"first-kd demo --suite system2: {report['title']} -> {report['out']}"]
    rows = [("model", "accuracy", "mean tokens")]
    rows += [(label, _fmt(r["accuracy"]), _fmt(r["mean_generated_tokens"], "{:.1f}"))
             for label, r in report["results"]["models"].items()]
    lines += text_table(rows)
    for key, which in (("filter", "System 2"), ("filter_s1", "System 1")):
        pseudo = (report["results"].get(key) or {}).get("pseudo_labels")
        if pseudo:
            lines.append(f"  {which} pseudo-labels: {pseudo['accuracy_kept']:.4f} kept ({pseudo['n_kept']}) vs "
                         f"{pseudo['accuracy_all']:.4f} all ({pseudo['n_all']})")
    lines += check_lines(report["checks"])
    lines.append(where_line(report))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def run(cfg) -> int:
    """`first-kd demo --suite system2` with a resolved DemoConfig (first_kd.demo.main)."""
    lay = Layout(cfg.out)
    _, timings = run_steps(cfg, lay, pipeline(cfg, lay), lambda: build_inputs(cfg, lay))
    return finish_with_checks(cfg, lay, timings, collect(lay), claims, demo_markdown, summary_text)
