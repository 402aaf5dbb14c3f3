"""The maze suite's task (`first-kd demo --suite maze`): grid mazes, A* search traces, and the checker of plans.

Pure functions only (no torch, no files): first_kd/demo/maze.py builds its data and scores its models with them.

A maze is an n x n grid of cells (x, y), 0 <= x, y < n, some of them walls, with a start and a goal cell. Moves go
one cell east, west, north or south. The text a model reads (the prompt) names every part of it:

    start 0 0 goal 4 3 wall 1 0 wall 2 2 wall 3 1

A* with the Manhattan distance as heuristic (consistent on this grid, so the plan it returns is a shortest one)
writes one clause per search event, as Searchformer and Dualformer write them (Lehnert et al. 2024, Su et al. 2024):

    create X Y cG cH   the cell enters the frontier (or is re-entered with a lower cost): G = cost so far, H = heuristic
    close X Y cG cH    the cell leaves the frontier, expanded

then the plan, one line per cell from start to goal:

    plan 0 0
    plan 0 1
    ...

Ties are broken deterministically: the frontier pops the lowest (G + H, H, x, y), neighbours are visited east,
west, north, south. A response is the clauses and the plan lines joined by newlines (the layout
`first-kd distill --trace-spec astar` reads); the plan alone is the solution-only response.

The checker reads a completion back the same way: an optional [slow] / [fast] marker line, trace lines, then
from the first line starting with "plan" the plan, every line of which must be `plan X Y`. A plan is valid when
it starts at the start, ends at the goal, moves one cell at a time and never leaves the grid or enters a wall;
optimal when it is valid and has as many moves as a shortest path. Several shortest paths may exist, so a plan
is never compared with one gold text.
"""

from __future__ import annotations

import heapq
import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Optional

Cell = tuple[int, int]
# east, west, north, south: the order A* visits neighbours in (its tie-break among equal keys is the key).
MOVES = ((1, 0), (-1, 0), (0, 1), (0, -1))
MARKERS = {"[slow]": "slow", "[fast]": "fast"}
# A clause as A* writes it, or with its costs stripped (Dualformer's levels L2 and L3 write "create X Y").
CLAUSE = re.compile(r"(create|close) (\d+) (\d+)(?: c(\d+) c(\d+))?")
PLAN_LINE = re.compile(r"plan (\d+) (\d+)")
# The answer `first-kd evaluate` and `generate` extract: the cell of the last plan line (the gold is the goal).
# The demo's own checker, not this, scores the plans.
EXTRACTOR = r"plan (?P<answer>\d+ \d+)"


@dataclass(frozen=True)
class Maze:
    size: int
    walls: frozenset
    start: Cell
    goal: Cell

    def open(self, cell: Cell) -> bool:
        """Whether `cell` is inside the grid and not a wall."""
        x, y = cell
        return 0 <= x < self.size and 0 <= y < self.size and cell not in self.walls

    def neighbours(self, cell: Cell) -> list[Cell]:
        return [(cell[0] + dx, cell[1] + dy) for dx, dy in MOVES if self.open((cell[0] + dx, cell[1] + dy))]


@dataclass(frozen=True)
class Clause:
    kind: str  # "create" or "close"
    cell: Cell
    cost: int  # G: moves from the start so far
    heuristic: int  # H: Manhattan distance to the goal

    def text(self) -> str:
        return f"{self.kind} {self.cell[0]} {self.cell[1]} c{self.cost} c{self.heuristic}"


def manhattan(a: Cell, b: Cell) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def astar(maze: Maze) -> Optional[tuple[list[Clause], list[Cell]]]:
    """(trace, plan) of A* from maze.start to maze.goal, or None when the goal cannot be reached.

    The trace opens with the start's create and ends with the goal's close; the plan lists the cells of a
    shortest path, start and goal included. A cell reached again with a lower cost is created again; the
    frontier's stale entries are skipped when popped."""
    goal = maze.goal
    cost, parent = {maze.start: 0}, {maze.start: None}
    h0 = manhattan(maze.start, goal)
    frontier = [(h0, h0, maze.start)]
    trace, closed = [Clause("create", maze.start, 0, h0)], set()
    while frontier:
        f, h, cell = heapq.heappop(frontier)
        if cell in closed or f != cost[cell] + h:
            continue
        closed.add(cell)
        trace.append(Clause("close", cell, cost[cell], h))
        if cell == goal:
            plan = [cell]
            while parent[plan[-1]] is not None:
                plan.append(parent[plan[-1]])
            return trace, plan[::-1]
        for nb in maze.neighbours(cell):
            if nb in closed or cost.get(nb, cost[cell] + 2) <= cost[cell] + 1:
                continue
            cost[nb], parent[nb] = cost[cell] + 1, cell
            hn = manhattan(nb, goal)
            heapq.heappush(frontier, (cost[nb] + hn, hn, nb))
            trace.append(Clause("create", nb, cost[nb], hn))
    return None


def shortest_moves(maze: Maze) -> Optional[int]:
    """Moves of a shortest path by breadth-first search (None: unreachable): A*'s answer checked another way."""
    return distances_from(maze, maze.start).get(maze.goal)


def distances_from(maze: Maze, source: Cell) -> dict[Cell, int]:
    """Moves from `source` to every cell it reaches (breadth-first)."""
    dist, queue = {source: 0}, deque([source])
    while queue:
        cell = queue.popleft()
        for nb in maze.neighbours(cell):
            if nb not in dist:
                dist[nb] = dist[cell] + 1
                queue.append(nb)
    return dist


def count_shortest_paths(maze: Maze) -> int:
    """How many distinct shortest paths join start and goal (0 when none): how many optimal plans exist."""
    dist = distances_from(maze, maze.start)
    if maze.goal not in dist:
        return 0
    ways = {maze.start: 1}
    for cell in sorted(dist, key=dist.__getitem__):
        for nb in maze.neighbours(cell):
            if dist.get(nb) == dist[cell] + 1:
                ways[nb] = ways.get(nb, 0) + ways[cell]
    return ways[maze.goal]


# ----------------------------------------------------------------------------------------------
# Mazes and their texts
# ----------------------------------------------------------------------------------------------


def random_maze(rng: random.Random, size: int, density: float) -> Maze:
    """A solvable maze: each cell a wall with probability `density`, start and goal two open cells at least
    `size - 1` moves apart (Manhattan), redrawn until A* reaches the goal."""
    cells = [(x, y) for y in range(size) for x in range(size)]
    while True:
        walls = frozenset(c for c in cells if rng.random() < density)
        free = [c for c in cells if c not in walls]
        if len(free) < 2:
            continue
        start, goal = rng.sample(free, 2)
        if manhattan(start, goal) < size - 1:
            continue
        maze = Maze(size, walls, start, goal)
        if shortest_moves(maze) is not None:
            return maze


def maze_prompt(maze: Maze) -> str:
    """The text a model reads: start, goal and the walls (row by row), ending in a newline."""
    words = ["start", *map(str, maze.start), "goal", *map(str, maze.goal)]
    for x, y in sorted(maze.walls, key=lambda c: (c[1], c[0])):
        words += ["wall", str(x), str(y)]
    return " ".join(words) + "\n"


def parse_prompt(prompt: str, size: int) -> Maze:
    """The maze a prompt written by maze_prompt describes."""
    numbers = {}
    for name in ("start", "goal"):
        m = re.search(rf"\b{name} (\d+) (\d+)", prompt)
        if not m:
            raise ValueError(f"no {name} in the maze prompt {prompt!r}")
        numbers[name] = (int(m.group(1)), int(m.group(2)))
    walls = frozenset((int(x), int(y)) for x, y in re.findall(r"\bwall (\d+) (\d+)", prompt))
    return Maze(size, walls, numbers["start"], numbers["goal"])


def plan_lines(plan: list[Cell]) -> list[str]:
    return [f"plan {x} {y}" for x, y in plan]


def trace_response(trace: list[Clause], plan: list[Cell]) -> str:
    """The full-trace response: every clause, then the plan, one per line."""
    return "\n".join([c.text() for c in trace] + plan_lines(plan))


def plan_response(plan: list[Cell]) -> str:
    """The solution-only response: the plan lines alone."""
    return "\n".join(plan_lines(plan))


# ----------------------------------------------------------------------------------------------
# Reading and checking a completion
# ----------------------------------------------------------------------------------------------


@dataclass
class Completion:
    """A completion read back: the marker it opens with (slow / fast / None), its trace lines (everything
    before the plan, the marker line excluded), the plan (None when it has no plan line, or when a line from the
    first plan line on is not `plan X Y`: then `malformed`) and how many trace lines are clauses (CLAUSE)."""

    marker: Optional[str]
    trace: list[str]
    plan: Optional[list[Cell]]
    clauses: int
    malformed: bool = False


def read_completion(text: str) -> Completion:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    marker = MARKERS.get(lines[0]) if lines else None
    if marker:
        lines = lines[1:]
    first = next((i for i, line in enumerate(lines) if line.startswith("plan")), len(lines))
    trace, tail = lines[:first], lines[first:]
    matches = [PLAN_LINE.fullmatch(line) for line in tail]
    plan = [(int(m.group(1)), int(m.group(2))) for m in matches] if tail and all(matches) else None
    return Completion(marker, trace, plan, sum(bool(CLAUSE.fullmatch(line)) for line in trace),
                      malformed=bool(tail) and plan is None)


def check_plan(maze: Maze, plan: Optional[list[Cell]], optimal_moves: int) -> tuple[bool, bool, str]:
    """(valid, optimal, reason) of a plan for `maze` whose shortest path has `optimal_moves` moves. The reason is
    "optimal", "longer than optimal", or what makes it invalid, the first found along the plan: "no plan",
    "wrong start", "out of bounds", "wall", "not a unit move", "wrong end"."""
    if not plan:
        return False, False, "no plan"
    if plan[0] != maze.start:
        return False, False, "wrong start"
    for i, cell in enumerate(plan):
        if not (0 <= cell[0] < maze.size and 0 <= cell[1] < maze.size):
            return False, False, "out of bounds"
        if cell in maze.walls:
            return False, False, "wall"
        if i and manhattan(plan[i - 1], cell) != 1:
            return False, False, "not a unit move"
    if plan[-1] != maze.goal:
        return False, False, "wrong end"
    if len(plan) - 1 == optimal_moves:
        return True, True, "optimal"
    return True, False, "longer than optimal"


def score_completion(maze: Maze, optimal_moves: int, text: str) -> dict:
    """What the suite measures of one completion: valid, optimal, the reason (check_plan's, or "malformed plan"),
    the marker it wrote, its trace lines and clauses, its plan (a list of [x, y], or None) and the trace's text."""
    done = read_completion(text)
    valid, optimal, reason = ((False, False, "malformed plan") if done.malformed
                              else check_plan(maze, done.plan, optimal_moves))
    return {"valid": valid, "optimal": optimal, "reason": reason, "marker": done.marker,
            "trace_lines": len(done.trace), "clauses": done.clauses,
            "plan": [list(c) for c in done.plan] if done.plan else None, "trace_text": trace_text(done.trace)}


def trace_text(trace: list[str]) -> str:
    """The trace as a response writes it before the plan (each line followed by a newline; '' for none): what
    the suite counts trace tokens of."""
    return "".join(line + "\n" for line in trace)


def plan_diversity(plans: list[Optional[list]], valid: list[bool], optimal: list[bool]) -> dict:
    """Of several sampled completions for one maze: how many distinct valid plans, and distinct optimal ones."""
    unique_valid = {tuple(map(tuple, p)) for p, ok in zip(plans, valid) if ok}
    unique_optimal = {tuple(map(tuple, p)) for p, ok in zip(plans, optimal) if ok}
    return {"unique_valid": len(unique_valid), "unique_optimal": len(unique_optimal)}
