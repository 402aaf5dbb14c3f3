"""The `first-kd` entry: a command whose module cannot be loaded is reported, never hidden."""

from __future__ import annotations

import first_kd.cli as cli


def test_a_command_that_fails_to_import_is_listed_and_reported(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_step_module.py").write_text("import no_such_package_for_first_kd\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "broken-step", ("broken_step_module", "BrokenConfig", "run_broken",
                                                      "a step whose module cannot be imported"))
    parser = cli.build_parser()
    listed = " ".join(parser.format_help().split())  # argparse wraps the help column
    assert "broken-step UNAVAILABLE: broken_step_module cannot be loaded (ModuleNotFoundError: No module named " \
           "'no_such_package_for_first_kd')" in listed
    # the other commands are all there and still parse
    for name in cli.COMMANDS:
        assert name in listed
    assert parser.parse_args(["demo", "--out", "x"]).command == "demo"

    # running it, with whatever options: one line naming the import error, exit code 2
    assert cli.main(["broken-step", "--out", "x", "k=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["first-kd broken-step: error: the command is unavailable: broken_step_module cannot be loaded "
                   "(ModuleNotFoundError: No module named 'no_such_package_for_first_kd')"]


def test_a_module_without_its_config_class_is_reported(tmp_path, monkeypatch, capsys):
    (tmp_path / "half_built_module.py").write_text("def run_half(cfg):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "half-built", ("half_built_module", "HalfConfig", "run_half", "half built"))
    assert cli.main(["half-built"]) == 2
    err = capsys.readouterr().err.strip()
    assert "half-built" in err and "AttributeError" in err and "HalfConfig" in err and len(err.splitlines()) == 1
