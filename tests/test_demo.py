"""`first-kd demo` and the recipe files in configs/.

What is checked, and against what:
  * the task generator: the true answer is the heaviest option by the world's hidden order (recomputed
    here from data/world.json), labels equal it at rate 1 - eps within a binomial bound and are spread
    uniformly over the four wrong options, splits are deterministic and independent of each other's
    sizes; the Bayes-optimal reference says exactly 1 - eps;
  * the demo end to end with a shortened budget: every promised file, report.json's keys and per-model
    metrics, commands.sh holds exactly the commands that ran (recorded at first_kd.cli.main) and each
    line parses with the CLI; re-running skips every finished step and changes no result; a deleted
    evaluation is redone alone; other options or a foreign directory are refused in one line;
  * configs/demo.yaml is the default run (`--config` reproduces DemoConfig's defaults), and every YAML
    in configs/ parses and validates against its commands' config classes (picked up automatically).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import shlex
from collections import Counter
from pathlib import Path

import pytest
import yaml

import first_kd.cli as cli
from first_kd import metrics
from first_kd.config import build, read_yaml
from first_kd.demo import calibration as demo
from first_kd.demo.main import DemoConfig
from first_kd.demo.runner import store_temperature
from helpers import assert_checks_hold_as_stated, is_png

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.y*ml"))

# Small enough for a 2-core CI machine (well under a minute), big enough that every step has work.
SHORT = ["n_items=6", "n_teacher=96", "n_train=64", "n_val=48", "n_test=64", "vocab_size=400",
         "teacher_hidden=32", "teacher_layers=1", "student_hidden=16", "student_layers=1",
         "teacher_steps=6", "student_steps=4", "batch_size=16"]


pytestmark = pytest.mark.usefixtures("torch_threads_restored")  # the demo sets --threads


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------


def test_questions_follow_the_hidden_order_and_noise_rate():
    eps, n = 0.25, 4000
    items, splits = demo.make_splits(7, 12, {"a": (n, eps)})
    assert len(set(items)) == 12
    weight = {name: rank for rank, name in enumerate(items)}
    flips, wrong_letters = 0, Counter()
    for r in splits["a"]:
        assert len(set(r["choices"])) == 5 and set(r["choices"]) <= set(items)
        heaviest = max(r["choices"], key=weight.__getitem__)
        assert r["true_answer"] == "ABCDE"[r["choices"].index(heaviest)]
        if r["answer"] != r["true_answer"]:
            flips += 1
            # which wrong option, counted relative to the true one, so position effects cancel out
            wrong_letters[("ABCDE".index(r["answer"]) - "ABCDE".index(r["true_answer"])) % 5] += 1
    sd = math.sqrt(eps * (1 - eps) / n)
    assert abs(flips / n - eps) < 4 * sd
    # each of the 4 wrong offsets gets a quarter of the flips (4 sd of a binomial share)
    for offset in (1, 2, 3, 4):
        share = wrong_letters[offset] / flips
        assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / flips), wrong_letters
    # the true answer is spread over the letters (the generator does not favour a position)
    positions = Counter(r["true_answer"] for r in splits["a"])
    assert all(abs(positions[L] / n - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n) for L in "ABCDE"), positions


def test_splits_are_deterministic_and_independent():
    items, a = demo.make_splits(3, 10, {"teacher": (50, 0.0), "test": (40, 0.25)})
    items2, b = demo.make_splits(3, 10, {"teacher": (500, 0.25), "test": (40, 0.25)})
    # a bigger, noisier teacher split leaves the test split unchanged
    assert items == items2 and a["test"] == b["test"]
    # noise only relabels: the same questions, and a noise-free split is labelled with the truth
    assert [r["choices"] for r in a["teacher"]] == [r["choices"] for r in b["teacher"][:50]]
    assert all(r["answer"] == r["true_answer"] for r in a["teacher"])
    _, c = demo.make_splits(4, 10, {"teacher": (50, 0.0), "test": (40, 0.25)})
    assert c["test"] != a["test"]
    assert len({r["id"] for r in a["teacher"] + a["test"]}) == 90


def test_bayes_reference_says_one_minus_eps():
    _, splits = demo.make_splits(0, 10, {"test": (3000, 0.3)})
    ref = demo.bayes_reference(splits["test"], 0.3)
    assert ref["mean_confidence"] == pytest.approx(0.7)
    agree = sum(r["answer"] == r["true_answer"] for r in splits["test"]) / 3000
    assert ref["accuracy"] == pytest.approx(agree)
    assert ref["ece"] == pytest.approx(abs(agree - 0.7), abs=1e-9)  # one confidence value, one bin
    assert ref["n"] == 3000


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    for args, needle in ((["eps=0.9"], "--eps"), (["n_items=3"], "--n-items"), (["k=3"], "--k"),
                         (["teacher_hidden=30", "heads=4"], "multiples of --heads")):
        assert cli.main(["demo", "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert cli.main(["demo"]) == 2
    assert "--out" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The demo end to end (shortened budget)
# ----------------------------------------------------------------------------------------------


class Recorder:
    """Wraps first_kd.cli.main to record the argv of every command the demo runs."""

    def __init__(self, monkeypatch):
        self.calls: list[list[str]] = []
        real = cli.main

        def main(argv=None):
            self.calls.append(list(argv))
            return real(argv)

        monkeypatch.setattr(cli, "main", main)

    def commands(self) -> list[str]:
        return [c[0] for c in self.calls]


def _run(out: Path, *extra: str) -> int:
    return cli.main(["demo", "--out", str(out), *SHORT, *extra])


def _commands_sh(out: Path) -> list[list[str]]:
    lines = [ln for ln in (out / "commands.sh").read_text().splitlines() if ln.startswith("first-kd ")]
    return [shlex.split(ln)[1:] for ln in lines]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One short demo run, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("demo") / "run"
    mp = pytest.MonkeyPatch()
    rec = Recorder(mp)
    try:
        assert _run(out) == 0
    finally:
        mp.undo()
    return out, rec.calls


def test_demo_writes_every_promised_file(finished):
    out, _ = finished
    for name in ("teacher", "train", "val", "test"):
        assert (out / "data" / f"{name}.jsonl").is_file()
    for path in ("commands.sh", "report.md", "report.json", "reliability.png", "training.png", "demo.yaml",
                 "data/world.json",
                 "runs/teacher/model/config.json", "stores/train.zarr", "stores/val.zarr", "stores/test.zarr"):
        assert (out / path).exists(), path
    for label in demo.MODEL_LABELS:
        assert (out / "eval" / label / "metrics.json").is_file()
        assert (out / "eval" / label / "reliability.png").is_file()
    for figure in ("reliability.png", "training.png"):
        assert is_png(out / figure)
    md = (out / "report.md").read_text()
    assert "| student_first |" in md and "## The demo" in md and "(training.png)" in md
    # the test split is what every model was scored on
    n_test = sum(1 for _ in open(out / "data" / "test.jsonl"))
    report = json.loads((out / "report.json").read_text())
    assert all(report["models"][m]["n"] == n_test for m in demo.MODEL_LABELS)


def test_report_json_holds_every_key(finished):
    out, _ = finished
    report = json.loads((out / "report.json").read_text())
    assert set(demo.MODEL_LABELS) <= set(report["models"])
    for label in demo.MODEL_LABELS:
        m = report["models"][label]
        # the report carries each evaluation's numbers as the evaluation wrote them, and its ECE is the
        # one of the reliability table written beside it
        evaluation = json.loads((out / "eval" / label / "metrics.json").read_text())
        for key in metrics.MODEL_SUMMARY_KEYS:
            assert isinstance(m[key], (int, float)) and m[key] == evaluation[key], (label, key)
        assert m["ece"] == pytest.approx(metrics.ece_from_bins(metrics.bins_from_json(evaluation["bins"])))
    t = report["temperature"]
    # the fit on val never leaves val worse calibrated than no temperature, and the test store records the same fit
    assert t["form"] == "prob" and t["ece_after"] <= t["ece_before"]
    assert t["fitted_on"]["path"] == str(out / "stores" / "val.zarr")
    fit = ("form", "value", "objective", "ece_before", "ece_after", "nll_before", "nll_after", "fitted_on")
    in_test_store = store_temperature(out / "stores" / "test.zarr")
    assert {k: in_test_store[k] for k in fit} == {k: t[k] for k in fit}
    store = report["store"]
    for key in ("bytes_per_position", "mean_topk_mass", "n_positions", "k", "complete"):
        assert key in store
    assert store["complete"] and store["k"] == 5 and store["n_positions"] == 64  # one answer position per question
    assert report["wall_seconds"] > 0
    # every student was validated along the way, at increasing steps ending at the budget
    for loss in ("ce", "kd", "ls", "first"):
        steps = [p["step"] for p in report["val_curves"][f"student_{loss}"]]
        assert steps == sorted(steps) and steps[-1] == 4 and len(steps) >= 2
    assert_checks_hold_as_stated(report["checks"])
    # each check measures what it names
    checks = {c["claim"]: c["value"] for c in report["checks"]}
    assert checks["teacher ECE before temperature >= 0.10"] == report["models"]["teacher"]["ece"]
    assert checks["teacher ECE after temperature <= 0.05"] == report["models"]["teacher_ts"]["ece"]
    assert checks["training store bytes per target position (top-k payload) <= 16"] == store["bytes_per_position"]
    first_full = report["models"]["student_first"]["full_vocabulary"]
    ce_full = report["models"]["student_ce"]["full_vocabulary"]
    assert checks["student_first full-vocabulary mass on the options >= 0.9"] == first_full["mean_options_mass"]
    assert checks["student_first full-vocabulary ECE / student_ce full-vocabulary ECE <= 0.5"] == pytest.approx(
        first_full["ece"] / ce_full["ece"])
    # the teacher with and without temperature differ only in confidence, never in the answers
    assert report["models"]["teacher"]["accuracy"] == report["models"]["teacher_ts"]["accuracy"]
    assert report["models"]["teacher_ts"]["temperature"]["value"] == t["value"]
    assert not report["models"]["teacher"].get("temperature")


def test_commands_sh_lists_the_commands_that_ran(finished):
    out, calls = finished
    ran = [c for c in calls if c[0] != "demo"]
    assert _commands_sh(out) == ran
    assert [c[0] for c in ran] == ["distill", "cache", "cache", "cache", "calibrate", "calibrate", "distill", "distill",
                                   "distill", "distill", "evaluate", "evaluate", "evaluate", "evaluate", "evaluate",
                                   "evaluate", "report"]
    losses = [c[c.index("--loss") + 1] for c in ran if c[0] == "distill"]
    assert losses == ["ce", "ce", "kd", "kd", "first"]
    ls = next(c for c in ran if c[0] == "distill" and "--teacher-smoothing" in c)
    assert "student_ls" in ls[ls.index("--out") + 1]
    # every line is a valid command line of the CLI
    parser = cli.build_parser()
    for argv in ran:
        assert parser.parse_args(argv).command == argv[0]
    # the students share the initialisation, budget, learning rate and seed
    students = [c for c in ran if c[0] == "distill"][1:]

    def opt(argv, flag):
        return argv[argv.index(flag) + 1]

    for flag in ("--student", "--max-steps", "--lr", "--batch-size", "--seed", "--schedule"):
        assert len({opt(c, flag) for c in students}) == 1, flag


def test_rerun_skips_finished_steps_and_redoes_missing_ones(finished, tmp_path, monkeypatch, capsys):
    # Works on the shared run and leaves it as it found it: what it deletes, the re-run restores.
    out, _ = finished
    report = json.loads((out / "report.json").read_text())
    model_file = out / "runs" / "student_first" / "model" / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns

    rec = Recorder(monkeypatch)
    assert _run(out) == 0
    assert rec.commands() == ["demo", "report"]  # everything else was done already
    again = json.loads((out / "report.json").read_text())
    for label in demo.MODEL_LABELS:
        assert again["models"][label]["ece"] == report["models"][label]["ece"]
    assert model_file.stat().st_mtime_ns == stamp
    assert (out / "report.md").read_text().count("## The demo") == 1  # appended once per report, not per run

    # an evaluation that went missing is redone, and only it
    import shutil

    shutil.rmtree(out / "eval" / "student_kd")
    rec.calls.clear()
    assert _run(out) == 0
    assert [c[0] for c in rec.calls] == ["demo", "evaluate", "report"]
    assert rec.calls[1][rec.calls[1].index("--label") + 1] == "student_kd"
    assert json.loads((out / "report.json").read_text())["models"]["student_kd"]["ece"] == \
        report["models"]["student_kd"]["ece"]
    capsys.readouterr()

    # other options in the same DIR: refused in one line, nothing touched
    assert _run(out, "eps=0.1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eps" in err and "other options" in err
    # a foreign non-empty directory: refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert _run(foreign) == 2
    assert "not empty" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# configs/
# ----------------------------------------------------------------------------------------------

# Values for options a recipe may leave to the command line (paths), per command, so the keys a recipe
# does give are validated with everything else the command needs present.
DUMMY_REQUIRED = {
    "cache": {"teacher": "t", "data": "d.jsonl", "out": "o.zarr"},
    "calibrate": {"store": "s.zarr", "val_store": "v.zarr"},
    "distill": {"student": "s", "out": "o", "store": "s.zarr"},
    "evaluate": {"out": "o", "model": "m", "data": "d.jsonl"},
    "report": {"runs": ["r"], "out": "o"},
    "demo": {"out": "o"},
    "inspect": {"store": "s.zarr"},
}


def _config_class(command: str):
    module, cls_name, _, _ = cli.COMMANDS[command]
    return getattr(importlib.import_module(module), cls_name)


def _with_dummies(command: str, given: dict) -> dict:
    """The recipe's options plus dummy values for the required ones it leaves out (never replacing its own)."""
    dummies = dict(DUMMY_REQUIRED.get(command, {}))
    if command == "evaluate" and "store" in given:  # a store recipe evaluates no model
        dummies.pop("model"), dummies.pop("data")
    if command == "distill" and "data" in given and given.get("loss") == "ce":
        dummies.pop("store")
    return {**dummies, **given}


def _sections(path: Path) -> dict:
    """{command: options} of a recipe: one section per command, or one flat mapping whose command is
    named by a `first-kd COMMAND` in the file's opening comments."""
    data = yaml.safe_load(path.read_text()) or {}
    assert isinstance(data, dict), f"{path.name} must hold a mapping"
    if data and all(k in cli.COMMANDS for k in data):
        return data
    header = "\n".join(ln for ln in path.read_text().splitlines() if ln.startswith("#"))
    named = [c for c in re.findall(r"first-kd\s+(\w+)", header) if c in cli.COMMANDS]
    assert named, f"{path.name} is a flat mapping: name its command in an opening comment (`first-kd COMMAND`)"
    return {named[0]: data}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_validates_against_its_commands(path):
    for command, options in _sections(path).items():
        assert isinstance(options, dict), f"{path.name}: section {command} must be a mapping"
        # unknown keys, values of the wrong type and invalid combinations raise FirstKDError here
        build(_config_class(command), _with_dummies(command, options), source=f"{path.name} [{command}]")
        # and the file reads through the CLI's own path (`--config FILE`), section lookup included
        assert read_yaml(str(path), command) == options


@pytest.mark.parametrize("name, suite", [("demo.yaml", "calibration"), ("demo-reasoning.yaml", "reasoning"),
                                              ("demo-system2.yaml", "system2"), ("demo-maze.yaml", "maze")])
def test_demo_yaml_is_the_default_run(name, suite):
    path = REPO / "configs" / name
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#") and f"first-kd demo --config configs/{name}" in first_line
    values = read_yaml(str(path), "demo")
    resolved = dataclasses.asdict(DemoConfig(suite=suite).resolved())
    assert values == {k: v for k, v in resolved.items() if k != "out" and v is not None}
    # and the CLI reads it to the same run as no --config at all
    parser = cli.build_parser()
    from first_kd.config import from_args

    via_yaml = from_args(DemoConfig, parser.parse_args(["demo", "--config", str(path), "--out", "x"]), "demo")
    plain = from_args(DemoConfig, parser.parse_args(["demo", "--suite", suite, "--out", "x"]), "demo")
    assert via_yaml.resolved() == plain.resolved()
