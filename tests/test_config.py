"""Typed configs: precedence of the sources, coercion and the one-line errors."""

import argparse
import dataclasses
from typing import List, Literal, Optional

import pytest

from first_kd.config import add_arguments, build, from_args, option
from first_kd.errors import FirstKDError


@dataclasses.dataclass
class Toy:
    path: Optional[str] = option(None, help="a positional path", positional=True)
    lr: float = option(1e-3, help="learning rate")
    steps: int = option(10, help="steps")
    mode: Literal["a", "b"] = option("a", help="mode")
    flag: bool = option(False, help="a switch")
    names: List[str] = option([], help="names")

    def validate(self):
        if self.steps < 0:
            raise FirstKDError("--steps must be >= 0")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, Toy)
    return from_args(Toy, parser.parse_args(argv), section="toy")


def test_precedence_defaults_yaml_overrides_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("toy:\n  lr: 0.5\n  steps: 3\n  mode: b\nother:\n  lr: 9\n")
    assert parse([]) == Toy()
    cfg = parse(["--config", str(cfg_file)])
    assert (cfg.lr, cfg.steps, cfg.mode) == (0.5, 3, "b")  # the command's own section only
    cfg = parse(["--config", str(cfg_file), "steps=4", "lr=0.25"])
    assert (cfg.lr, cfg.steps) == (0.25, 4)
    cfg = parse(["--config", str(cfg_file), "steps=4", "--steps", "5"])
    assert cfg.steps == 5


def test_flat_yaml_and_positional(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 7\nflag: true\nnames: [x, y]\n")
    cfg = parse(["somewhere", "--config", str(cfg_file), "--no-flag"])
    assert (cfg.path, cfg.steps, cfg.flag, cfg.names) == ("somewhere", 7, False, ["x", "y"])
    assert parse(["--names", "p,q"]).names == ["p", "q"]


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "x"], "must be int"),
    (["--steps", "1.5"], "must be int"),
    (["--mode", "c"], "one of a, b"),
    (["one", "two"], "unexpected argument 'two'"),
    (["bogus=1"], "unknown option"),
    (["--steps", "-1"], "--steps must be >= 0"),
])
def test_bad_values_are_one_line_errors(argv, needle):
    with pytest.raises(FirstKDError, match=needle) as info:
        parse(argv)
    assert "\n" not in str(info.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(FirstKDError, match="not valid YAML"):
        parse(["--config", str(bad)])
    with pytest.raises(FirstKDError, match="not found"):
        parse(["--config", str(tmp_path / "none.yaml")])


def test_required_fields_are_named():
    @dataclasses.dataclass
    class Needs:
        store: str = option(help="store", positional=True)
        out: str = option(help="out")

    with pytest.raises(FirstKDError, match="STORE, --out"):
        build(Needs, {})


def test_override_values_keep_text_that_is_not_a_yaml_scalar():
    @dataclasses.dataclass
    class T:
        template: str = option("x", help="template")
        lr: float = option(1.0, help="lr")

    parser = argparse.ArgumentParser()
    add_arguments(parser, T)
    cfg = from_args(T, parser.parse_args(["template=Question: {q}", "lr=1e-4"]))
    assert cfg.template == "Question: {q}" and cfg.lr == 1e-4
