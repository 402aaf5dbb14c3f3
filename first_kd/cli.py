"""`first-kd` command line: one subcommand per pipeline step.

Each command is a typed config dataclass plus a `run(cfg)` function in its own module; this file
only wires them to argparse and turns user errors into one line on stderr with exit code 2.
A command's module is imported only when the parser is built, and one that fails to import does not
take the others down: --help lists it as unavailable with the error, and running it prints that error in
one line (exit code 2).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from first_kd.errors import FirstKDError

# name -> (module, config class, run function, one-line description)
COMMANDS = {
    "cache": ("first_kd.commands.cache", "CacheConfig", "run_cache",
              "run the teacher once and cache its top-k log-probs in a zarr store"),
    "inspect": ("first_kd.commands.inspect", "InspectConfig", "run_inspect",
                "verify a store and summarise it (--json for machines)"),
    "calibrate": ("first_kd.commands.calibrate", "CalibrateConfig", "run_calibrate",
                  "fit the teacher temperature on a held-out store and record it"),
    "generate": ("first_kd.commands.generate", "GenerateConfig", "run_generate",
                 "have the teacher write rationales (sampled, resumable) and extract their answers"),
    "filter": ("first_kd.commands.filter", "FilterConfig", "run_filter",
               "keep generated rationales by correctness (Fine-tune-CoT) or self-consistency (System-2)"),
    "distill": ("first_kd.commands.distill", "DistillConfig", "run_distill",
                "train a student: FIRST / KD from a store, or plain fine-tuning (ce)"),
    "evaluate": ("first_kd.commands.evaluate", "EvaluateConfig", "run_evaluate",
                 "accuracy and calibration of a model or a teacher store on a dataset"),
    "report": ("first_kd.commands.report", "ReportConfig", "run_report",
               "collect evaluation runs into report.md / report.json with reliability figures"),
    "demo": ("first_kd.demo.main", "DemoConfig", "run_demo",
             "the whole pipeline on tiny models and data built locally (CPU, minutes); --suite reasoning for teacher-written "
             "rationales, --suite system2 for System-2 distillation of a prompt program, --suite maze for Dualformer "
             "on A* search traces"),
}


def _quiet_libraries() -> None:
    # transformers 5 draws its own progress bars for every save/load; ours say what matters.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # transformers missing is reported when a command needs it
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:
        pass


def build_parser() -> argparse.ArgumentParser:
    from first_kd import __version__
    from first_kd.config import add_arguments

    parser = argparse.ArgumentParser(
        prog="first-kd",
        description="Calibrated top-k logit distillation of causal LMs (FIRST).",
    )
    parser.add_argument("--version", action="version", version=f"first-kd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, cls_name, _, desc) in COMMANDS.items():
        module, problem = load_command(name)
        if problem:
            # Still listed, so the user learns why it is missing; running it reports the problem (main).
            sub.add_parser(name, help=f"UNAVAILABLE: {problem}", description=f"{desc}. UNAVAILABLE: {problem}")
            continue
        p = sub.add_parser(name, help=desc, description=desc)
        add_arguments(p, getattr(module, cls_name))
    return parser


_LOADED: dict = {}  # (module, config class, run function) -> (module or None, problem or "")


def load_command(name: str):
    """(the module of command `name`, "") or (None, one line saying why it cannot be loaded). Python does not
    keep a module that failed to import, so the outcome is kept here: each module is tried once per process."""
    module_name, cls_name, run_name, _ = COMMANDS[name]
    key = (module_name, cls_name, run_name)
    if key not in _LOADED:
        try:
            module = importlib.import_module(module_name)
            for attr in (cls_name, run_name):
                getattr(module, attr)
            _LOADED[key] = (module, "")
        except Exception as e:  # noqa: BLE001 - any failure while importing (ImportError, SyntaxError, ...)
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _LOADED[key] = (None, f"{module_name} cannot be loaded ({type(e).__name__}"
                                  f"{': ' + detail if detail else ''})")
    return _LOADED[key]


def main(argv=None) -> int:
    _quiet_libraries()
    parser = build_parser()
    # Known arguments first: an unavailable command takes none, and its problem matters more than its options.
    args, unknown = parser.parse_known_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _, cls_name, run_name, _ = COMMANDS[args.command]
    mod, problem = load_command(args.command)
    if problem:
        print(f"first-kd {args.command}: error: the command is unavailable: {problem}", file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # what parse_args says
    from first_kd.config import from_args

    try:
        cfg = from_args(getattr(mod, cls_name), args, section=args.command)
        result = getattr(mod, run_name)(cfg)
    except FirstKDError as e:
        print(f"first-kd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only directory, a path that vanished: one line, not a traceback
        print(f"first-kd {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"first-kd {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system failure: what failed, where, and that finished outputs are intact
    (every command builds its output beside the old one and swaps it in only when complete)."""
    import errno

    where = f" at {e.filename}" if getattr(e, "filename", None) else ""
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    reason = e.strerror or str(e) or type(e).__name__
    fix = {errno.ENOSPC: "free disk space", errno.EFBIG: "free disk space or raise the file-size limit",
           errno.EDQUOT: "free space in your quota", errno.EACCES: "make the output writable or choose another --out",
           errno.EROFS: "choose an --out on a writable filesystem", errno.EPERM: "check the output's permissions",
           errno.ENOENT: "check the path"}.get(e.errno, "fix the cause")
    return (f"{reason}{f' ({code})' if code else ''}{where}: {fix} and re-run the same command "
            "(finished outputs were left as they were)")


if __name__ == "__main__":
    sys.exit(main())
