"""Helpers shared by the tests, written once: import them with `from helpers import NAME`.

(pytest puts tests/ on sys.path, as it does for conftest.py; test modules never import each other.)
"""

from __future__ import annotations

import math
import re


def assert_checks_hold_as_stated(checks: list[dict]) -> None:
    """A demo's checks ({"claim": "WHAT OP BOUND", "value", "ok"}, OP one of >=, <=, ==) say the truth:
    `ok` is whether the measured value satisfies the bound the claim states (a NaN value satisfies none)."""
    assert checks, "no checks"
    for check in checks:
        stated = re.fullmatch(r"(.+) (>=|<=|==) (-?\d+(?:\.\d+)?)", check["claim"])
        assert stated, f"a check must end with OP BOUND: {check['claim']!r}"
        op, bound, value = stated.group(2), float(stated.group(3)), float(check["value"])
        holds = not math.isnan(value) and {">=": value >= bound - 1e-12, "<=": value <= bound + 1e-12,
                                           "==": abs(value - bound) < 1e-9}[op]
        assert check["ok"] is holds, check
