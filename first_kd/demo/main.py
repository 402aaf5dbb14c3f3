"""`first-kd demo`: the options of every suite (DemoConfig) and the dispatch to the chosen suite.

Each suite is a module of this package (calibration, reasoning, system2, maze) with the same four public names:
DEFAULTS (its values of the suite-dependent options), check_options(cfg) (its own option checks),
run(cfg) (the suite on a resolved DemoConfig) and the task and pipeline it describes. They share
first_kd.demo.runner, and every step they take is a public command run through first_kd.cli.main.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from first_kd.config import option
from first_kd.demo import calibration, maze, reasoning, system2
from first_kd.demo.runner import require
from first_kd.errors import FirstKDError

# --suite NAME -> the module that runs it.
SUITE_MODULES = {"calibration": calibration, "reasoning": reasoning, "system2": system2, "maze": maze}
SUITES = tuple(SUITE_MODULES)
# Options whose default depends on the suite: None in a config means "the suite's default". An option
# that only one suite has is refused with the other (it would silently do nothing).
SUITE_DEFAULTS: dict[str, dict] = {name: module.DEFAULTS for name, module in SUITE_MODULES.items()}


def suite_option(name: str, help: str):
    """A suite-dependent option: default None, the help names each suite's default."""
    defaults = "; ".join(f"{suite}: {d[name]!r}" for suite, d in SUITE_DEFAULTS.items() if name in d)
    return option(None, help=f"{help} (default {defaults})")


@dataclass
class DemoConfig:
    out: Optional[str] = option(None, help="directory for everything the demo writes (data, models, stores, "
                                           "runs, evaluations, report.md, report.json, commands.sh)")
    suite: Literal["calibration", "reasoning", "system2", "maze"] = option(
        "calibration", help="calibration: FIRST on a noisy-label multiple-choice task (first_kd/demo/calibration.py); "
                            "reasoning: teacher-written rationales, self-consistency filtering and fast/slow "
                            "trace dropping on multi-digit addition (first_kd/demo/reasoning.py); system2: System-2 "
                            "distillation of a Rephrase-and-Respond program on coin flips (first_kd/demo/system2.py); "
                            "maze: Dualformer (randomised A* traces, fast/slow markers) against full-trace and "
                            "solution-only students on mazes built here (first_kd/demo/maze.py)")
    seed: int = option(0, help="seed of the task world, the label noise, the model initialisations and data order")
    # --- the task -----------------------------------------------------------------------------------
    n_items: Optional[int] = suite_option("n_items", "calibration: objects in the made-up world (their hidden "
                                                      "weight order is the rule)")
    eps: Optional[float] = suite_option("eps", "calibration: probability that a label is replaced by a random "
                                                "wrong option (train, val, test)")
    teacher_eps: Optional[float] = suite_option(
        "teacher_eps", "calibration: label noise of the teacher's own fine-tuning split; 0 = a teacher that knows "
                       "the rule (a tiny teacher that memorises noisy labels loses the rule: see first_kd/demo/calibration.py)")
    digits: Optional[int] = suite_option("digits", "reasoning: digits of each addend")
    people: Optional[int] = suite_option("people", "system2: people in each coin-flip question (the answer is "
                                                    "the parity of their flips)")
    direct_share: Optional[float] = suite_option(
        "direct_share", "system2: share of the teacher's questions that also teach it the direct answer (the rest "
                        "teach only the program's rephrasing, so System 1 is the route it was barely shown)")
    maze_size: Optional[int] = suite_option("maze_size", "maze: side of the square grid (cells per row)")
    wall_density: Optional[float] = suite_option("wall_density", "maze: probability that a cell is a wall (only "
                                                                  "solvable mazes are kept)")
    n_teacher: Optional[int] = suite_option("n_teacher", "questions the teacher is fine-tuned on (never seen by "
                                                          "the students)")
    n_train: Optional[int] = suite_option("n_train", "questions the students are trained on")
    n_val: Optional[int] = suite_option("n_val", "held-out questions the temperature is fitted on (not system2)")
    n_test: Optional[int] = suite_option("n_test", "held-out questions every reported number is measured on")
    vocab_size: Optional[int] = suite_option("vocab_size", "BPE vocabulary size of the tokenizer trained on the task")
    # --- the models ---------------------------------------------------------------------------------
    teacher_hidden: Optional[int] = suite_option("teacher_hidden", "teacher hidden size")
    teacher_layers: Optional[int] = suite_option("teacher_layers", "teacher transformer layers")
    student_hidden: Optional[int] = suite_option("student_hidden", "student hidden size")
    student_layers: Optional[int] = suite_option("student_layers", "student transformer layers")
    heads: int = option(4, help="attention heads of both models")
    # --- training -----------------------------------------------------------------------------------
    teacher_steps: Optional[int] = suite_option("teacher_steps", "optimizer steps of the teacher's fine-tuning")
    teacher_lr: Optional[float] = suite_option("teacher_lr", "teacher peak learning rate")
    student_steps: Optional[int] = suite_option("student_steps", "optimizer steps of each student (the same "
                                                                  "budget for all)")
    student_lr: Optional[float] = suite_option("student_lr", "student peak learning rate")
    batch_size: int = option(32, help="questions per optimizer step (teacher and students)")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", help="learning-rate decay after warmup")
    k: int = option(5, help="top-k kept per position by `first-kd cache`")
    form: Literal["prob", "logit"] = option("prob", help="temperature form fitted by `first-kd calibrate` "
                                                         "(prob: FIRST's softmax(p / c))")
    # --- the reasoning suite's teacher-written targets ------------------------------------------------
    samples: Optional[int] = suite_option("samples", "reasoning, system2: rationales (program runs) the teacher "
                                                      "writes per train question; maze: plans each student samples "
                                                      "per maze (plan diversity)")
    sample_temperature: Optional[float] = suite_option("sample_temperature",
                                                        "reasoning, system2, maze: sampling temperature of those "
                                                        "rationales (plans)")
    agreement: Optional[float] = suite_option("agreement", "reasoning, system2: self-consistency threshold (share of the "
                                                            "samples that must give the majority answer)")
    max_per_question: Optional[int] = suite_option("max_per_question", "reasoning: correct rationales kept per "
                                                                        "question (Fine-tune-CoT)")
    trace_levels: Optional[str] = suite_option("trace_levels", "reasoning: trace drop levels of the dual-mode "
                                                                "student (0 = full trace, 1 = answer only)")
    trace_probs: Optional[str] = suite_option(
        "trace_probs", "maze: probabilities p0..p4 of the dual-mode student's trace levels, drawn per example and "
                       "epoch (L0 full A* trace, L1 no close clauses, L2 also no costs, L3 also 30 percent of the creates "
                       "dropped, L4 no trace: fast mode)")
    diversity_mazes: Optional[int] = suite_option("diversity_mazes", "maze: test mazes whose plans are sampled "
                                                                      "--samples times each (plan diversity)")
    threads: int = option(1, help="torch CPU threads; tiny models run fastest on one, and more threads "
                                  "on a shared machine spin against each other")


    def resolved(self) -> "DemoConfig":
        """This config with the suite's defaults filled in where an option was left unset."""
        defaults = SUITE_DEFAULTS[self.suite]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def validate(self) -> None:
        if not self.out:
            raise FirstKDError("missing --out (the directory the demo writes everything to)")
        if Path(self.out).is_file():
            raise FirstKDError(f"--out {self.out} is a file: give a directory")
        foreign = sorted(k for d in SUITE_DEFAULTS.values() for k in d
                         if k not in SUITE_DEFAULTS[self.suite] and getattr(self, k) is not None)
        if foreign:
            flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
            other = next(s for s in SUITES if foreign[0] in SUITE_DEFAULTS[s])
            raise FirstKDError(f"{flags} belong(s) to --suite {other}, not {self.suite}: drop it or set --suite {other}")
        r = self.resolved()
        # A suite without a split (system2 has no val) leaves its size None.
        sizes = [v for v in (r.n_teacher, r.n_train, r.n_val, r.n_test) if v is not None]
        # A suite without a teacher (maze) leaves the teacher's options None too.
        hidden = [v for v in (r.teacher_hidden, r.student_hidden) if v is not None]
        layers = [v for v in (r.teacher_layers, r.student_layers) if v is not None]
        steps = [v for v in (r.teacher_steps, r.student_steps) if v is not None]
        lrs = [v for v in (r.teacher_lr, r.student_lr) if v is not None]
        checks = [
            (min(sizes) >= 1,
             "--n-teacher, --n-train, --n-val and --n-test must all be >= 1"),
            (r.vocab_size >= 300, f"--vocab-size must be >= 300 (256 bytes + merges); got {r.vocab_size}"),
            (min(*hidden, *layers, r.heads) >= 1, "model sizes must be >= 1"),
            (all(h % r.heads == 0 for h in hidden),
             f"--teacher-hidden and --student-hidden must be multiples of --heads ({r.heads})"),
            (min(steps) >= 1, "--teacher-steps and --student-steps must be >= 1"),
            (min(lrs) > 0, "--teacher-lr and --student-lr must be > 0"),
            (r.batch_size >= 1, f"--batch-size must be >= 1; got {r.batch_size}"),
            (r.threads >= 1, f"--threads must be >= 1; got {r.threads}"),
        ]
        require(checks)
        SUITE_MODULES[r.suite].check_options(r)


def run_demo(cfg: DemoConfig) -> int:
    """`first-kd demo`: the chosen suite with its defaults filled in."""
    cfg = cfg.resolved()
    return SUITE_MODULES[cfg.suite].run(cfg)
