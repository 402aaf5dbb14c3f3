"""`first-kd demo --suite maze`: the mazes, A*, the plan checker, the suite options, and a short end-to-end run.

A* is checked against an independent breadth-first search written here (its plan's length is a shortest path's on
many seeded mazes) and its trace against what A* with a consistent heuristic must write (every clause well-formed,
each cell closed once at its true distance, in non-decreasing f order, after a create with the same costs). The
checker is checked on completions constructed by hand, with exact results. The end-to-end run uses a budget small
enough for CI and checks the plumbing (every step ran through the CLI, the promised files and report keys, each
figure recomputed from its own predictions, resumption), never the suite's outcomes: each trained student is
replaced, right after its `distill` step, by a model whose text is fixed by construction, so what evaluate and
generate write is known on any machine.
"""

from __future__ import annotations

import json
import random
import re
import shlex
from collections import deque
from pathlib import Path

import pytest

import first_kd.cli as cli
from first_kd.config import build
from first_kd.demo import maze as demo
from first_kd.demo import maze_task as task
from first_kd.demo.main import DemoConfig
from first_kd.errors import FirstKDError
from helpers import assert_checks_hold_as_stated, read_jsonl, write_fixed_text_model

pytestmark = pytest.mark.usefixtures("torch_threads_restored")  # the demo sets --threads


def _bfs(maze: task.Maze) -> dict:
    """Moves from the start to every reachable cell, by a breadth-first search of its own."""
    dist, queue = {maze.start: 0}, deque([maze.start])
    while queue:
        x, y = queue.popleft()
        for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if 0 <= nx < maze.size and 0 <= ny < maze.size and (nx, ny) not in maze.walls and (nx, ny) not in dist:
                dist[(nx, ny)] = dist[(x, y)] + 1
                queue.append((nx, ny))
    return dist


def _mazes(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        size = 3 + i % 5
        yield task.random_maze(rng, size, (0.0, 0.2, 0.3, 0.4)[i % 4])


# ----------------------------------------------------------------------------------------------
# A*
# ----------------------------------------------------------------------------------------------


def test_astar_plans_are_shortest_and_valid():
    for maze in _mazes(600):
        dist = _bfs(maze)
        trace, plan = task.astar(maze)
        assert len(plan) - 1 == dist[maze.goal] == task.shortest_moves(maze)
        assert plan[0] == maze.start and plan[-1] == maze.goal
        for a, b in zip(plan, plan[1:]):
            assert abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1
        assert all(c in dist for c in plan)  # in bounds, no wall: the search reached it
        assert task.check_plan(maze, plan, dist[maze.goal]) == (True, True, "optimal")


def test_astar_traces_are_well_formed():
    for maze in _mazes(600, seed=1):
        dist = _bfs(maze)
        trace, plan = task.astar(maze)
        h = lambda c: abs(c[0] - maze.goal[0]) + abs(c[1] - maze.goal[1])  # noqa: E731
        assert trace[0] == task.Clause("create", maze.start, 0, h(maze.start))
        assert trace[-1].kind == "close" and trace[-1].cell == maze.goal
        created, closed, last_f = set(), [], -1
        for c in trace:
            assert task.CLAUSE.fullmatch(c.text()) and c.heuristic == h(c.cell)
            assert maze.open(c.cell) and c.cost >= dist[c.cell]
            if c.kind == "create":
                created.add((c.cell, c.cost))
            else:
                # a consistent heuristic closes each cell once, at its true distance, in non-decreasing f
                assert c.cell not in closed and c.cost == dist[c.cell] and (c.cell, c.cost) in created
                assert c.cost + c.heuristic >= last_f
                closed.append(c.cell)
                last_f = c.cost + c.heuristic
        text = task.trace_response(trace, plan).split("\n")
        assert text == [c.text() for c in trace] + [f"plan {x} {y}" for x, y in plan]


def test_unreachable_goal_and_counting_shortest_paths():
    walled = task.Maze(3, frozenset({(1, 0), (1, 1), (1, 2)}), (0, 0), (2, 2))
    assert task.astar(walled) is None and task.shortest_moves(walled) is None
    assert task.count_shortest_paths(walled) == 0
    assert task.count_shortest_paths(task.Maze(3, frozenset(), (0, 0), (2, 2))) == 6  # C(4, 2)
    assert task.count_shortest_paths(task.Maze(4, frozenset(), (0, 0), (3, 2))) == 10  # C(5, 2)

    def enumerate_shortest(maze):
        dist, out = _bfs(maze), []

        def walk(path):
            if path[-1] == maze.goal:
                out.append(path)
                return
            for nb in maze.neighbours(path[-1]):
                if dist.get(nb) == len(path) and nb not in path:
                    walk(path + [nb])
        walk([maze.start])
        return [p for p in out if len(p) - 1 == dist[maze.goal]]

    for maze in _mazes(60, seed=2):
        assert task.count_shortest_paths(maze) == len(enumerate_shortest(maze))


# ----------------------------------------------------------------------------------------------
# Mazes and splits
# ----------------------------------------------------------------------------------------------


def test_random_mazes_are_solvable_and_prompts_read_back():
    rng = random.Random(5)
    for i in range(300):
        size = 3 + i % 5
        maze = task.random_maze(rng, size, 0.35)
        assert maze.start != maze.goal and maze.open(maze.start) and maze.open(maze.goal)
        assert task.manhattan(maze.start, maze.goal) >= size - 1
        assert task.shortest_moves(maze) is not None
        prompt = task.maze_prompt(maze)
        assert prompt.endswith("\n") and task.parse_prompt(prompt, size) == maze


def test_splits_are_disjoint_deterministic_and_right():
    sizes = {"train": 40, "test": 25}
    splits = demo.make_splits(3, 5, 0.3, sizes)
    assert splits == demo.make_splits(3, 5, 0.3, sizes)
    assert splits != demo.make_splits(4, 5, 0.3, sizes)
    prompts = [r["prompt"] for r in splits["train"]] + [r["question"] for r in splits["test"]]
    assert len(set(prompts)) == len(prompts) == 65
    assert [r["prompt"] for r in splits["train_plan"]] == [r["prompt"] for r in splits["train"]]
    for full, plan in zip(splits["train"], splits["train_plan"]):
        lines = full["response"].split("\n")
        assert plan["response"].split("\n") == [ln for ln in lines if ln.startswith("plan ")]
        assert all(task.CLAUSE.fullmatch(ln) for ln in lines if not ln.startswith("plan "))
    for r in splits["test"]:
        maze = task.parse_prompt(r["question"], r["size"])
        assert r["answer"] == f"{maze.goal[0]} {maze.goal[1]}" and r["optimal_moves"] == _bfs(maze)[maze.goal]
        # evaluate's extractor reads the goal from the last plan line of a right answer
        from first_kd.data.rationale import extract_answer

        assert extract_answer(task.plan_response(task.astar(maze)[1]), task.EXTRACTOR) == r["answer"]
    questions = demo.diversity_questions(splits["test"], 3)
    assert questions["diverse"] == splits["test"][:3]
    for mode in ("slow", "fast"):
        assert [q["question"] for q in questions[f"diverse_{mode}"]] == [r["question"] + f"[{mode}]\n"
                                                                         for r in splits["test"][:3]]
    with pytest.raises(FirstKDError, match="distinct 3x3 mazes"):
        demo.make_splits(0, 3, 0.3, {"train": 4000})  # 3,720 solvable 3x3 mazes exist


def test_the_tokenizer_keeps_cells_whole_and_marker_lines_apart_from_the_prompt():
    from first_kd.tiny import train_tokenizer

    splits = demo.make_splits(0, 4, 0.3, {"train": 200, "test": 10})
    texts = [r["prompt"] + r["response"] for r in splits["train"]]
    tok = train_tokenizer(texts + ["[slow]\n[fast]\n"] * 20, 400, pieces=demo.PIECES)
    # every cell one token wherever it is written (a wall, a clause, a plan line), every cost one token
    for text in ("wall 1 2", "create 1 2 c3 c4\n", "plan 1 2", "start 1 2"):
        assert "Ġ1Ġ2" in tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]), text  # " 1 2"
    assert len(tok("create 1 2 c3 c4\n", add_special_tokens=False)["input_ids"]) == 5
    assert all(tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t for t in texts)
    assert all(demo.marker_seam_holds(tok, r["question"]) for r in splits["test"])
    with pytest.raises(ValueError, match="not both"):
        train_tokenizer(texts, 400, split_digits=True, pieces=demo.PIECES)
    # a tokenizer that merged " [" (a prompt ending in a space): the marker's first token changes at the seam
    merged = train_tokenizer(["go [slow]\n", "go [fast]\n"] * 50, 300)
    assert not demo.marker_seam_holds(merged, "go ")


# ----------------------------------------------------------------------------------------------
# The checker
# ----------------------------------------------------------------------------------------------

# 3x3, wall at (1, 0): the one shortest path from (0, 0) to (2, 0) goes round it through row 1 (4 moves).
WALLED = task.Maze(3, frozenset({(1, 0)}), (0, 0), (2, 0))
OPEN = task.Maze(3, frozenset(), (0, 0), (2, 2))  # six shortest paths of 4 moves


def _plan(*cells) -> str:
    return "\n".join(f"plan {x} {y}" for x, y in cells)


@pytest.mark.parametrize("text, valid, optimal, reason", [
    (_plan((0, 0), (0, 1), (1, 1), (2, 1), (2, 0)), True, True, "optimal"),
    (_plan((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0)), True, False, "longer than optimal"),
    (_plan((0, 0), (0, 1), (1, 1), (1, 0), (2, 0)), False, False, "wall"),
    (_plan((0, 0), (0, 1), (0, 2), (0, 3), (1, 3)), False, False, "out of bounds"),
    (_plan((0, 0), (2, 0)), False, False, "not a unit move"),
    (_plan((0, 1), (1, 1), (2, 1), (2, 0)), False, False, "wrong start"),
    (_plan((0, 0), (0, 1), (1, 1)), False, False, "wrong end"),
    ("create 0 0 c0 c2\nclose 0 0 c0 c2", False, False, "no plan"),
    ("", False, False, "no plan"),
    (_plan((0, 0), (0, 1)) + "\nplan 1\n" + _plan((2, 1), (2, 0)), False, False, "malformed plan"),
    (_plan((0, 0), (0, 1)) + "\ncreate 1 1 c2 c2\n" + _plan((1, 1), (2, 1), (2, 0)), False, False, "malformed plan"),
])
def test_checker_on_constructed_plans(text, valid, optimal, reason):
    score = task.score_completion(WALLED, 4, text)
    assert (score["valid"], score["optimal"], score["reason"]) == (valid, optimal, reason)


def test_checker_reads_markers_traces_and_plans_exactly():
    text = ("[slow]\ncreate 0 0 c0 c2\nclose 0 0 c0 c2\ncreate 0 1\nnot a clause\n"
            + _plan((0, 0), (0, 1), (1, 1), (2, 1), (2, 0)) + "\n")
    assert task.score_completion(WALLED, 4, text) == {
        "valid": True, "optimal": True, "reason": "optimal", "marker": "slow", "trace_lines": 4, "clauses": 3,
        "plan": [[0, 0], [0, 1], [1, 1], [2, 1], [2, 0]],
        "trace_text": "create 0 0 c0 c2\nclose 0 0 c0 c2\ncreate 0 1\nnot a clause\n"}
    fast = task.score_completion(WALLED, 4, "[fast]\n" + _plan((0, 0), (0, 1), (1, 1), (2, 1), (2, 0)))
    assert (fast["marker"], fast["trace_lines"], fast["trace_text"], fast["optimal"]) == ("fast", 0, "", True)
    # several shortest paths: each is optimal, none is compared with one gold text
    right = _plan((0, 0), (1, 0), (2, 0), (2, 1), (2, 2))
    up = _plan((0, 0), (0, 1), (0, 2), (1, 2), (2, 2))
    zigzag = _plan((0, 0), (1, 0), (1, 1), (2, 1), (2, 2))
    scores = [task.score_completion(OPEN, 4, t) for t in (right, up, zigzag, up, "plan 0 0")]
    assert [s["optimal"] for s in scores] == [True, True, True, True, False]
    assert task.plan_diversity([s["plan"] for s in scores], [s["valid"] for s in scores],
                               [s["optimal"] for s in scores]) == {"unique_valid": 3, "unique_optimal": 3}


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def test_demo_help_names_the_suite_and_its_options(capsys):
    with pytest.raises(SystemExit) as done:  # argparse formats every help string (a bare % would break it)
        cli.main(["demo", "--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for needle in ("calibration|reasoning|system2|maze", "--maze-size", "--wall-density", "--trace-probs",
                   "--diversity-mazes"):
        assert needle in printed, needle


def test_suite_options_resolve_and_foreign_ones_are_refused():
    r = build(DemoConfig, {"out": "x", "suite": "maze"}).resolved()
    assert r.maze_size == demo.DEFAULTS["maze_size"] and r.trace_probs == demo.DEFAULTS["trace_probs"]
    assert r.teacher_hidden is None and r.n_teacher is None and r.digits is None and r.samples == 4
    assert build(DemoConfig, {"out": "x", "suite": "maze", "maze_size": 4}).resolved().maze_size == 4
    with pytest.raises(FirstKDError, match="--digits belong.*--suite reasoning"):
        build(DemoConfig, {"out": "x", "suite": "maze", "digits": 2})
    with pytest.raises(FirstKDError, match="--teacher-steps belong.*--suite calibration"):
        build(DemoConfig, {"out": "x", "suite": "maze", "teacher_steps": 5})
    with pytest.raises(FirstKDError, match="--maze-size belong.*--suite maze"):
        build(DemoConfig, {"out": "x", "maze_size": 5})
    for options, needle in (({"maze_size": 2}, "--maze-size must be in"), ({"wall_density": 0.7}, "--wall-density"),
                            ({"trace_probs": "0.5,0.5"}, "--trace-probs"),
                            ({"trace_probs": "0.5,0.1,0.2,0.2,0"}, "p4"),
                            ({"diversity_mazes": 500, "n_test": 100}, "--diversity-mazes"),
                            ({"student_hidden": 30}, "multiples of --heads")):
        with pytest.raises(FirstKDError, match=needle):
            build(DemoConfig, {"out": "x", "suite": "maze", **options})


# ----------------------------------------------------------------------------------------------
# The demo end to end (a CI budget; the students replaced by fixed-text models)
# ----------------------------------------------------------------------------------------------

SHORT = ["suite=maze", "maze_size=3", "n_train=16", "n_test=4", "student_hidden=32", "student_layers=1",
         "student_steps=2", "batch_size=8", "samples=2", "diversity_mazes=2"]
FIXED_TEXT = "plan 2 1"


def run_with_fixed_students(out, monkeypatch):
    """The short demo through first_kd.cli.main, recording every command's argv; when a student's `distill`
    returns, its model becomes a fixed-text model writing FIXED_TEXT after any prompt (they all end in a newline)."""
    calls, fixed = [], []
    real_main = cli.main

    def recording_main(argv=None):
        calls.append(list(argv))
        code = real_main(argv)
        if argv[0] == "distill":
            fixed[:] = write_fixed_text_model(Path(argv[argv.index("--out") + 1]) / "model", FIXED_TEXT, ["\n"])
        return code

    monkeypatch.setattr(cli, "main", recording_main)
    return real_main(["demo", "--out", str(out), *SHORT]), calls, fixed


def test_maze_demo_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    code, calls, fixed = run_with_fixed_students(out, monkeypatch)
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert_checks_hold_as_stated(report["checks"])
    results = report["results"]
    for name in ("report.md", "commands.sh", "demo.yaml", "timings.json", "data/train.jsonl", "data/train_plan.jsonl",
                 "data/diverse_slow.jsonl", "runs/dualformer/summary.json", "eval/dualformer/predictions.jsonl",
                 "generated/dualformer_fast.jsonl", "generated/solution_only.jsonl"):
        assert (out / name).exists(), name
    assert "## The Dualformer maze demo" in (out / "report.md").read_text()
    assert set(results["models"]) == set(demo.STUDENTS)
    assert set(results["models"]["dualformer"]) == {"slow", "fast", "auto"}
    assert set(results["diversity"]) == {name for name, _, _ in demo.DIVERSITY}

    # commands.sh lists exactly the commands that ran, each one parseable by the CLI
    shell = [line for line in (out / "commands.sh").read_text().splitlines() if line.startswith("first-kd ")]
    assert [shlex.split(line)[1:] for line in shell] == calls
    assert [argv[0] for argv in calls] == ["distill"] * 3 + ["evaluate"] * 3 + ["generate"] * 4 + ["report"]
    parser = cli.build_parser()
    for argv in calls:
        parser.parse_args(argv)
    dual = calls[0]
    assert dual[dual.index("--trace-spec") + 1] == "astar" and "--trace-spec" not in calls[1] + calls[2]

    # What the fixed students wrote, known in advance: "plan 2 1" and EOS after every prompt, in every mode; no
    # trace; an invalid plan ("wrong end" where the maze starts at (2, 1), "wrong start" elsewhere).
    tests = read_jsonl(out / "data" / "test.jsonl")
    reasons = {}
    for r in tests:
        start = task.parse_prompt(r["question"], 3).start
        reason = "wrong end" if start == (2, 1) else "wrong start"
        reasons[reason] = reasons.get(reason, 0) + 1
    for label, modes in results["models"].items():
        predictions = read_jsonl(out / "eval" / label / "predictions.jsonl")
        for mode, m in modes.items():
            lines = [p for p in predictions if p["mode"] == mode]
            assert {p["completion"] for p in lines} == {FIXED_TEXT}, (label, mode)
            assert m["n"] == len(lines) == 4 and m["reasons"] == dict(sorted(reasons.items())), (label, mode)
            assert (m["valid_rate"], m["optimal_rate"], m["mean_trace_tokens"], m["mean_trace_clauses"]) == (0, 0, 0, 0)
            assert m["mean_generated_tokens"] == len(fixed)  # from evaluate's own count: the text and EOS
    for name, d in results["diversity"].items():
        samples = read_jsonl(out / "generated" / f"{name}.jsonl")
        assert len(samples) == 2 * 2 and {s["rationale"] for s in samples} == {FIXED_TEXT}
        assert (d["mazes"], d["samples_per_maze"], d["mean_unique_valid"], d["valid_rate"]) == (2, 2, 0, 0)
    assert [json.loads(line)["question"] for line in (out / "data" / "diverse_slow.jsonl").read_text().splitlines()] \
        == [r["question"] + "[slow]\n" for r in tests[:2]]
    astar = results["astar"]
    assert (astar["n"], astar["optimal_rate"], astar["valid_rate"]) == (4, 1.0, 1.0) and astar["mean_trace_tokens"] > 0

    for label, modes in results["models"].items():
        for mode in modes:
            assert re.search(rf"^  {label} +{mode} ", printed, re.M), (label, mode)
    for c in report["checks"]:
        assert f"[{'ok' if c['ok'] else 'MISSED'}] {c['claim']} ({c['value']:.4f})" in printed

    # Re-running skips every finished step and leaves the results as they were.
    calls.clear()
    assert cli.main(["demo", "--out", str(out), *SHORT]) == 0
    assert [argv[0] for argv in calls] == ["demo", "report"]
    assert json.loads((out / "report.json").read_text())["results"] == results
