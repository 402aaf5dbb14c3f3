"""`first-kd demo --suite maze`: Dualformer (Su et al. 2024) against its two baselines on mazes built here.

The task: shortest paths in small grid mazes
--------------------------------------------
An n x n grid (`maze_size`) whose cells are walls with probability `wall_density`, a start and a goal at least
n - 1 moves apart; only solvable mazes are kept. The prompt names them ("start 0 0 goal 4 3 wall 1 0 ..."); the
A* search that solves a maze (Manhattan heuristic, deterministic ties) writes its trace as `create X Y cG cH` /
`close X Y cG cH` clauses, then the plan `plan X Y`, one line per cell (first_kd/demo/maze_task.py). The tokenizer
is a byte-level BPE trained on the data (first_kd.tiny.train_tokenizer) on pieces that keep a cell's coordinates
together (PIECES): every cell is one token (" 1 2"), in the prompt's walls as in the trace, and so is every cost
(" c3"), so a clause is five tokens ("create", " 1 2", " c3", " c4", newline) and whether a cell is a wall is the
lookup of one token in the prompt.

Why this task: the plan's first moves depend on walls the path meets later, which a small model must see at
once when it writes the plan directly; the A* trace writes the search down, each clause a short lookup of the
clauses before it. Dropped parts of the trace (closes, costs, some creates) are redundant with the rest, which
is what Dualformer's structured dropping relies on.

Splits (DIR/data): `train` (prompt + full A* trace + plan), `train_plan` (prompt + plan only), `test` (the prompt
as a question, the goal as the gold answer, the maze's size and shortest-path length), and the first
`diversity_mazes` test mazes as `diverse` (plain prompt), `diverse_slow` / `diverse_fast` (prompt + marker line,
the mode forced). No maze is in two splits.

The story, every step a public command (DIR/commands.sh)
--------------------------------------------------------
1. three students from one initialisation with one budget (`student_steps` x `batch_size`), `distill --loss ce`:
   dualformer     `--trace-spec astar --trace-probs P`: each example's trace dropped by structure, the level drawn
                  per example and epoch with probabilities p0..p4 (L0 the full trace, L1 no close clauses, L2 also
                  no cost tokens, L3 also 30% of the creates, L4 no trace); the target opens with [slow] when some
                  trace is left and with [fast] at L4; plan lines are never dropped;
   full_trace     the full trace and the plan, no marker (Searchformer's data);
   solution_only  the plan alone;
2. `evaluate --modes`: greedy completions of the test mazes; dualformer in slow and fast mode (marker forced) and
   auto (the marker drawn from the student's own probabilities of the two with --auto-seed, then greedy),
   the baselines in their one mode (auto: a model trained without markers just answers);
3. `generate --samples S --temperature T`: S completions per maze of the first `diversity_mazes` test mazes, for
   plan diversity; dualformer's modes forced by the marker written at the end of its prompt (tokenized as training
   tokenized it: build_inputs checks), the baselines in their one mode;
4. `report` of the three evaluations, then the suite's own scores (report.md, report.json): `evaluate`'s accuracy
   only says whether the last plan line is the goal; the demo reads every completion in predictions.jsonl and
   generate's samples with the maze's own checker (valid and optimal plans, trace tokens, the modes auto chose,
   unique valid plans per maze).

The checks are the paper's directions (never forced): dualformer's slow mode at least as optimal as full_trace with
shorter traces; its fast mode more optimal than solution_only; auto between slow and fast in trace length with an
optimal rate near slow's; slow mode's plans at least as diverse as full_trace's.

Sizes, as measured (seed 0, on a 2-core machine shared with other jobs; docs/demo-maze-results.md)
-------------------------------------------------------------------------------------------------
5x5 mazes with 30% walls: an A* trace is 17 clauses (86 tokens) on average, a plan 6-7 cells (~20 tokens), a prompt
~20 tokens. The students (hidden 64, 2 layers, 174k parameters) learn A* late and suddenly: full_trace wrote an
optimal plan for 0.045 of the test mazes after 1,000 steps and 0.795 after 2,000; at 800 steps with GPT-2's
byte-level split (a cell two tokens, a cost two) no student wrote a valid plan. A seed takes about 15 min (850 s of
CPU): training 384 s (dualformer), 422 s (full_trace) and 93 s (solution_only), evaluation and sampling 23 s.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from first_kd.data.trace_spec import load_trace_spec
from first_kd.data.traces import parse_probs
from first_kd.demo import maze_task, runner
from first_kd.demo.maze_task import (EXTRACTOR, astar, maze_prompt, parse_prompt, plan_response, random_maze,
                                     trace_response)
from first_kd.demo.runner import (Step, check_lines, checks_table, finish_with_checks, require, run_steps, text_table,
                                  where_line, write_jsonl)
from first_kd.errors import FirstKDError

STUDENTS = ("dualformer", "full_trace", "solution_only")
# The built-in trace spec the dualformer student trains with (configs/traces/astar.yaml: levels L0-L4).
TRACE_SPEC = "astar"
# The samples generate draws for plan diversity: (name, student, the mode its prompt forces or None)
DIVERSITY = (("dualformer_slow", "dualformer", "slow"), ("dualformer_fast", "dualformer", "fast"),
             ("full_trace", "full_trace", None), ("solution_only", "solution_only", None))
MARKER_LINES = {"slow": "[slow]\n", "fast": "[fast]\n"}
# Tokens per cell of the grid a response may need: up to two clauses of at most 8 tokens (5 once the tokenizer has
# merged every cell and cost) and a plan line of at most 4 (A* creates a cell again only when it finds a cheaper
# way, which the grid rarely allows).
RESPONSE_TOKENS_PER_CELL = 20
PROMPT_TOKENS_PER_CELL = 3  # "wall x y"
# What the tokenizer may merge into one token: a coordinate pair (" 1 2"), any other word with its leading space
# (" c3", "create"), one whitespace character.
PIECES = r" ?\d+ \d+| ?\S+|\s"
# make_splits gives up after this many mazes in a row that were drawn before.
MAX_REPEATS = 1000
# The suite's values of the suite-dependent options of DemoConfig (first_kd.demo.main).
DEFAULTS = dict(maze_size=5, wall_density=0.3, n_train=8000, n_test=200, vocab_size=400, student_hidden=64,
                student_layers=2, student_steps=2000, student_lr=3e-3, trace_probs="0.45,0.1,0.1,0.1,0.25", samples=4,
                sample_temperature=1.0, diversity_mazes=50)


def check_options(cfg) -> None:
    """The suite's own checks of a resolved DemoConfig (the shared ones are DemoConfig.validate's)."""
    require([
        (3 <= cfg.maze_size <= 9, f"--maze-size must be in 3..9; got {cfg.maze_size}"),
        (0.0 <= cfg.wall_density <= 0.5, f"--wall-density must be in [0, 0.5]; got {cfg.wall_density}"),
        (cfg.samples >= 1, f"--samples must be >= 1; got {cfg.samples}"),
        (cfg.sample_temperature > 0, f"--sample-temperature must be > 0; got {cfg.sample_temperature}"),
        (1 <= cfg.diversity_mazes <= cfg.n_test,
         f"--diversity-mazes must be in 1..--n-test ({cfg.n_test}); got {cfg.diversity_mazes}"),
    ])
    spec = load_trace_spec(TRACE_SPEC)
    try:
        probs = parse_probs(cfg.trace_probs, spec.level_names)
    except ValueError as e:
        raise FirstKDError(f"--trace-probs {cfg.trace_probs}: {e}") from None
    if probs[-1] in (0.0, 1.0):
        raise FirstKDError(f"--trace-probs {cfg.trace_probs}: p4 (no trace: fast mode) must be in (0, 1) so that the "
                           "student learns both modes")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def max_length(size: int) -> int:
    """Tokens of the longest prompt + marker + response a maze of side `size` may need."""
    return (PROMPT_TOKENS_PER_CELL + RESPONSE_TOKENS_PER_CELL) * size * size + 16


def max_new_tokens(size: int) -> int:
    return RESPONSE_TOKENS_PER_CELL * size * size


def make_splits(seed: int, size: int, density: float, sizes: dict[str, int]) -> dict[str, list[dict]]:
    """{split: records}: `sizes[split]` distinct mazes per split ("train" and "test"), no maze in two splits.

    train: prompt + the full-trace response; train_plan: the same prompts + the plan alone; test: the prompt as a
    question, the goal "X Y" as the answer (what evaluate's extractor reads from the last plan line), the size
    and the shortest path's moves."""
    rng = random.Random(f"{seed}-maze-{size}-{density}")
    seen: set[str] = set()
    out: dict[str, list[dict]] = {"train": [], "train_plan": [], "test": []}
    for name, n in sizes.items():
        repeats = 0  # mazes drawn in a row that were drawn before: many means few are left
        while len(out[name]) < n:
            maze = random_maze(rng, size, density)
            prompt = maze_prompt(maze)
            if prompt in seen:
                repeats += 1
                if repeats > MAX_REPEATS:
                    raise FirstKDError(f"could not draw {n} distinct {size}x{size} mazes for {name} ({len(seen)} drawn "
                                       "in all): raise --maze-size or lower --n-train / --n-test")
                continue
            repeats = 0
            seen.add(prompt)
            trace, plan = astar(maze)
            rid = f"{name}-{len(out[name])}"
            if name == "test":
                out["test"].append({"id": rid, "question": prompt, "answer": f"{maze.goal[0]} {maze.goal[1]}",
                                    "size": size, "optimal_moves": len(plan) - 1})
            else:
                out[name].append({"id": rid, "prompt": prompt, "response": trace_response(trace, plan)})
                out["train_plan"].append({"id": rid, "prompt": prompt, "response": plan_response(plan)})
    return out


def diversity_questions(test: list[dict], n: int) -> dict[str, list[dict]]:
    """The first `n` test mazes as generate's question files: plain (`diverse`) and with a mode forced by the marker
    line at the end of the prompt (`diverse_slow`, `diverse_fast`)."""
    first = test[:n]
    out = {"diverse": first}
    for mode, line in MARKER_LINES.items():
        out[f"diverse_{mode}"] = [{**r, "question": r["question"] + line} for r in first]
    return out


def marker_seam_holds(tokenizer, prompt: str) -> bool:
    """Whether prompt + a marker line tokenizes to the prompt's ids followed by the marker line's own ids, as
    training (prompt and target apart) and `evaluate --modes` (marker forced) build them: only then does a
    question file with the marker at the end of its prompt force the mode the student learnt."""
    base = tokenizer(prompt)["input_ids"]
    return all(tokenizer(prompt + line)["input_ids"] == base + tokenizer(line, add_special_tokens=False)["input_ids"]
               for line in MARKER_LINES.values())


def build_inputs(cfg, lay: runner.Layout) -> dict[str, list[dict]]:
    """Data splits, the tokenizer and the students' untrained model (skipped when present)."""
    from first_kd.tiny import build_llama, train_tokenizer

    splits = make_splits(cfg.seed, cfg.maze_size, cfg.wall_density, {"train": cfg.n_train, "test": cfg.n_test})
    files = {**splits, **diversity_questions(splits["test"], cfg.diversity_mazes)}
    lay.data.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        if not lay.split(name).is_file():
            write_jsonl(lay.split(name), rows)
    student_dir = lay.models / "student-init"
    if (student_dir / "config.json").is_file():
        return splits
    # The markers are in the corpus so they get tokens of their own.
    texts = [r["prompt"] + r["response"] for r in splits["train"]] + ["[slow]\n[fast]\n"] * 100
    tokenizer = train_tokenizer(texts, cfg.vocab_size, pieces=PIECES)
    bad = next((r["question"] for r in splits["test"] if not marker_seam_holds(tokenizer, r["question"])), None)
    if bad is not None:
        raise FirstKDError(f"the tokenizer merges a marker line into the maze prompt {bad!r}, so a forced mode would "
                           "not be what the student learnt: try another --vocab-size")
    build_llama(student_dir, tokenizer, hidden_size=cfg.student_hidden, num_layers=cfg.student_layers,
                num_heads=cfg.heads, max_position_embeddings=max_length(cfg.maze_size), seed=cfg.seed)
    return splits


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


class Layout(runner.Layout):
    """The shared layout plus generate's samples."""

    def __init__(self, out: str):
        super().__init__(out)
        self.generated = self.root / "generated"


def student_steps(cfg, lay: Layout) -> list[Step]:
    """The three students: one initialisation, one budget, `distill --loss ce`."""
    common = ["--student", str(lay.models / "student-init"), "--loss", "ce", "--max-steps", str(cfg.student_steps),
              "--lr", str(cfg.student_lr), "--batch-size", str(cfg.batch_size), "--schedule", cfg.schedule,
              "--seed", str(cfg.seed), "--max-length", str(max_length(cfg.maze_size)), "--save-every", "0"]
    data = {"dualformer": lay.split("train"), "full_trace": lay.split("train"),
            "solution_only": lay.split("train_plan")}
    extra = {"dualformer": ["--trace-spec", TRACE_SPEC, "--trace-probs", cfg.trace_probs, "--trace-seed", str(cfg.seed)],
             "full_trace": [], "solution_only": []}
    comment = {"dualformer": f"Dualformer: A* traces dropped by structure (levels L0-L4 drawn with probabilities "
                             f"{cfg.trace_probs}, per example and epoch), opened by [slow] / [fast]",
               "full_trace": "baseline (Searchformer): the full A* trace and the plan",
               "solution_only": "baseline: the plan alone"}
    return [Step(f"student {label}", ["distill", *common, "--data", str(data[label]), *extra[label],
                                      "--out", str(lay.runs / label)],
                 lambda s=label: (lay.runs / s / "summary.json").is_file(), comment[label])
            for label in STUDENTS]


def completion_options(cfg) -> list[str]:
    """What evaluate and generate share: the prompt verbatim, the plan's last cell as the answer, the room."""
    return ["--cue", "", "--qa-template", "{question}", "--extractor", EXTRACTOR, "--max-new-tokens",
            str(max_new_tokens(cfg.maze_size)), "--max-length", str(max_length(cfg.maze_size))]


def evaluation_steps(cfg, lay: Layout) -> list[Step]:
    steps = []
    for label in STUDENTS:
        modes = "slow,fast,auto" if label == "dualformer" else "auto"
        steps.append(Step(
            f"evaluate {label}", ["evaluate", "--model", str(lay.runs / label / "model"), "--data",
                                  str(lay.split("test")), "--modes", modes, *completion_options(cfg),
                                  "--auto-seed", str(cfg.seed), "--batch-size", "50", "--label", label,
                                  "--out", str(lay.evals / label)],
            lambda s=label: (lay.evals / s / "metrics.json").is_file(),
            f"{label} solves the test mazes (greedy), modes {modes}"))
    for name, label, mode in DIVERSITY:
        data = lay.split(f"diverse_{mode}" if mode else "diverse")
        out = lay.generated / f"{name}.jsonl"
        steps.append(Step(
            f"sample {name}", ["generate", "--teacher", str(lay.runs / label / "model"), "--data", str(data),
                               "--out", str(out), "--samples", str(cfg.samples), "--temperature",
                               str(cfg.sample_temperature), *completion_options(cfg), "--batch-size", "16",
                               "--seed", str(cfg.seed)],
            lambda o=out: o.is_file(),
            f"{label} writes {cfg.samples} plan(s) per maze at temperature {cfg.sample_temperature:g} for plan "
            "diversity" + (f", {mode} mode forced by the marker at the end of the prompt" if mode else "")))
    return steps


def pipeline(cfg, lay: Layout) -> list[Step]:
    report = Step("report", ["report", ",".join(str(lay.evals / s) for s in STUDENTS), "--labels", ",".join(STUDENTS),
                             "--title", f"first-kd Dualformer maze demo (seed {cfg.seed})", "--out", str(lay.root)],
                  lambda: False, "collect the evaluations into report.md / report.json / reliability.png")
    return [*student_steps(cfg, lay), *evaluation_steps(cfg, lay), report]


# ----------------------------------------------------------------------------------------------
# Scores: every completion read with the maze's checker
# ----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def score_rows(rows: list[dict], tests: dict[str, dict], count_tokens) -> list[dict]:
    """Each completion ({"id", "completion"}) scored against its test maze; `count_tokens(text)` counts trace tokens."""
    scored = []
    for row in rows:
        test = tests[row["id"]]
        maze = parse_prompt(test["question"], test["size"])
        s = maze_task.score_completion(maze, test["optimal_moves"], row["completion"])
        s["trace_tokens"] = count_tokens(s.pop("trace_text"))
        scored.append({**row, **s})
    return scored


def summarize(scored: list[dict]) -> dict:
    """Rates and means of scored completions; `generated_tokens` and `chosen_mode` when the rows carry them."""
    n = len(scored)
    if not n:
        return {"n": 0}

    def mean(key):
        return sum(r[key] for r in scored) / n

    out = {"n": n, "valid_rate": mean("valid"), "optimal_rate": mean("optimal"),
           "mean_trace_tokens": mean("trace_tokens"), "mean_trace_clauses": mean("clauses"),
           "reasons": dict(sorted(Counter(r["reason"] for r in scored).items()))}
    if all("n_generated_tokens" in r for r in scored):
        out["mean_generated_tokens"] = mean("n_generated_tokens")
    if any(r.get("chosen_mode") for r in scored):
        counts = Counter(r.get("chosen_mode") or "none" for r in scored)
        out["chosen_modes"] = {k: counts[k] / n for k in sorted(counts)}
    return out


def diversity(scored: list[dict], tests: dict[str, dict]) -> dict:
    """Per maze over its samples: distinct valid and optimal plans; averaged over the mazes, with how many optimal
    plans exist (capped at the samples drawn: the most a maze could show)."""
    by_maze = defaultdict(list)
    for r in scored:
        by_maze[r["id"]].append(r)
    if not by_maze:
        return {"mazes": 0}
    per = []
    for rid, rows in by_maze.items():
        d = maze_task.plan_diversity([r["plan"] for r in rows], [r["valid"] for r in rows],
                                     [r["optimal"] for r in rows])
        test = tests[rid]
        exist = maze_task.count_shortest_paths(parse_prompt(test["question"], test["size"]))
        per.append({**d, "exist": min(exist, len(rows))})
    m = len(per)
    return {"mazes": m, "samples_per_maze": len(scored) / m,
            "valid_rate": sum(r["valid"] for r in scored) / len(scored),
            "optimal_rate": sum(r["optimal"] for r in scored) / len(scored),
            "mean_unique_valid": sum(p["unique_valid"] for p in per) / m,
            "mean_unique_optimal": sum(p["unique_optimal"] for p in per) / m,
            "mean_optimal_plans_available": sum(p["exist"] for p in per) / m}


def astar_reference(tests: dict[str, dict], count_tokens) -> dict:
    """The A* the students learnt from, scored like them: every plan optimal, its trace's tokens and clauses."""
    rows = []
    for rid, test in tests.items():
        trace, plan = astar(parse_prompt(test["question"], test["size"]))
        rows.append({"id": rid, "completion": trace_response(trace, plan)})
    return summarize(score_rows(rows, tests, count_tokens))


def collect(cfg, lay: Layout) -> dict:
    """Per student and mode: the checker's scores of its greedy completions; per sampled set: plan diversity; the
    A* reference on the same mazes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(lay.models / "student-init"))

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    tests = {r["id"]: r for r in read_jsonl(lay.split("test"))}
    models = {}
    for label in STUDENTS:
        predictions = score_rows(read_jsonl(lay.evals / label / "predictions.jsonl"), tests, count_tokens)
        by_mode = defaultdict(list)
        for p in predictions:
            by_mode[p["mode"]].append(p)
        models[label] = {mode: summarize(rows) for mode, rows in by_mode.items()}
    sampled = {}
    for name, _, _ in DIVERSITY:
        rows = [{"id": r["id"], "completion": r["rationale"]} for r in read_jsonl(lay.generated / f"{name}.jsonl")]
        sampled[name] = diversity(score_rows(rows, tests, count_tokens), tests)
    return {"models": models, "diversity": sampled, "astar": astar_reference(tests, count_tokens)}


# ----------------------------------------------------------------------------------------------
# Checks and the report
# ----------------------------------------------------------------------------------------------


def claims(results: dict) -> list[dict]:
    """The paper's directions, each with its measured value and whether it holds here."""
    m = results["models"]
    slow, fast, auto = m["dualformer"]["slow"], m["dualformer"]["fast"], m["dualformer"]["auto"]
    full, plan = m["full_trace"]["auto"], m["solution_only"]["auto"]
    d = results["diversity"]

    def claim(text, value, ok):
        return {"claim": text, "value": value, "ok": ok}

    # NaN (a check that cannot hold) when full_trace wrote no trace to compare with
    ratio = slow["mean_trace_tokens"] / full["mean_trace_tokens"] if full["mean_trace_tokens"] else float("nan")
    between = min(auto["mean_trace_tokens"] - fast["mean_trace_tokens"],
                  slow["mean_trace_tokens"] - auto["mean_trace_tokens"])
    more = d["dualformer_slow"]["mean_unique_valid"] - d["full_trace"]["mean_unique_valid"]
    return [
        claim("dualformer slow optimal rate - full_trace optimal rate >= 0",
              slow["optimal_rate"] - full["optimal_rate"], slow["optimal_rate"] >= full["optimal_rate"]),
        claim("dualformer slow mean trace tokens / full_trace mean trace tokens <= 0.9", ratio, ratio <= 0.9),
        claim("dualformer fast optimal rate - solution_only optimal rate >= 0.05",
              fast["optimal_rate"] - plan["optimal_rate"], fast["optimal_rate"] - plan["optimal_rate"] >= 0.05 - 1e-12),
        claim("dualformer auto trace tokens inside [fast, slow]: min(auto - fast, slow - auto) >= 0", between,
              between >= 0),
        claim("dualformer slow optimal rate - auto optimal rate <= 0.05",
              slow["optimal_rate"] - auto["optimal_rate"], slow["optimal_rate"] - auto["optimal_rate"] <= 0.05 + 1e-12),
        claim("unique valid plans per maze: dualformer slow - full_trace >= 0", more, more >= 0),
    ]


def _f(value, fmt="{:.4f}") -> str:
    return fmt.format(value) if value is not None else "n/a"


def score_rows_of(results: dict) -> list[tuple]:
    """(model, mode, optimal, valid, trace tokens, trace clauses, generated tokens) per evaluated mode, A* first."""
    rows = []
    a = results["astar"]
    rows.append(("A* (the data)", "-", _f(a["optimal_rate"]), _f(a["valid_rate"]), _f(a["mean_trace_tokens"], "{:.1f}"),
                 _f(a["mean_trace_clauses"], "{:.1f}"), "-"))
    for label, modes in results["models"].items():
        for mode, r in modes.items():
            rows.append((label, mode, _f(r.get("optimal_rate")), _f(r.get("valid_rate")),
                         _f(r.get("mean_trace_tokens"), "{:.1f}"), _f(r.get("mean_trace_clauses"), "{:.1f}"),
                         _f(r.get("mean_generated_tokens"), "{:.1f}")))
    return rows


def demo_markdown(report: dict) -> str:
    cfg, results = report["demo"], report["results"]
    lines = [
        "## The Dualformer maze demo", "",
        f"Task: shortest paths in {cfg['maze_size']}x{cfg['maze_size']} mazes (walls with probability "
        f"{cfg['wall_density']:g}); students trained on A* traces. Scores are the maze checker's, from each "
        "completion in predictions.jsonl (evaluate's accuracy above only says whether the last plan line is the "
        "goal). See first_kd/demo/maze.py.", "",
        "| model | mode | optimal | valid | trace tokens | trace clauses | generated tokens |",
        "|:---|:---|---:|---:|---:|---:|---:|",
        *["| " + " | ".join(r) + " |" for r in score_rows_of(results)], ""]
    auto = results["models"]["dualformer"].get("auto", {}).get("chosen_modes")
    if auto:
        lines += ["dualformer in auto mode chose: " + ", ".join(f"{k} {v:.1%}" for k, v in auto.items()), ""]
    lines += [f"Plan diversity: {cfg['samples']} samples per maze at temperature {cfg['sample_temperature']:g} on "
              f"{cfg['diversity_mazes']} test mazes (dualformer's modes forced by the marker).", "",
              "| samples | optimal | valid | unique valid plans / maze | unique optimal / maze | optimal plans that "
              "exist (capped at samples) |", "|:---|---:|---:|---:|---:|---:|"]
    for name, d in results["diversity"].items():
        lines.append(f"| {name} | {_f(d.get('optimal_rate'))} | {_f(d.get('valid_rate'))} | "
                     f"{_f(d.get('mean_unique_valid'), '{:.2f}')} | {_f(d.get('mean_unique_optimal'), '{:.2f}')} | "
                     f"{_f(d.get('mean_optimal_plans_available'), '{:.2f}')} |")
    lines += ["", *checks_table(report["checks"]),
              "", f"Wall time {report['wall_seconds']:.0f} s; every command is in [commands.sh](commands.sh).", ""]
    return "\n".join(lines)


def summary_text(report: dict) -> str:
    results = report["results"]
    lines = ["", f"first-kd demo --suite maze: {report['title']} -> {report['out']}"]
    lines += text_table([("model", "mode", "optimal", "valid", "trace tok", "clauses", "gen tok"),
                         *score_rows_of(results)], left=2)
    auto = results["models"]["dualformer"].get("auto", {}).get("chosen_modes")
    if auto:
        lines.append("  dualformer auto chose: " + ", ".join(f"{k} {v:.1%}" for k, v in auto.items()))
    lines.append("  unique valid plans per maze: " + ", ".join(
        f"{name} {_f(d.get('mean_unique_valid'), '{:.2f}')}" for name, d in results["diversity"].items()))
    lines += check_lines(report["checks"])
    lines.append(where_line(report))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def run(cfg) -> int:
    """`first-kd demo --suite maze` with a resolved DemoConfig (first_kd.demo.main)."""
    lay = Layout(cfg.out)
    _, timings = run_steps(cfg, lay, pipeline(cfg, lay), lambda: build_inputs(cfg, lay))
    return finish_with_checks(cfg, lay, timings, collect(cfg, lay), claims, demo_markdown, summary_text)
