"""The layout rule of docs/architecture.md, checked on the source so it stays true.

    library (every module outside commands/, demo/ and cli.py)
        never imports first_kd.commands, first_kd.demo or first_kd.cli
    commands/X
        imports the library, never another command
    demo/
        runs commands through the CLI entry only: never imports first_kd.commands
    everywhere
        no `_private` name is imported from (or read off) another first_kd module
        no function or method is longer than 100 lines
        no import cycle between first_kd modules (imports inside functions count too)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "first_kd"
MAX_FUNCTION_LINES = 100


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("commands", "demo", "cli"):
        return parts[1]
    return "library"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported first_kd module, names imported from it, line) for every import in `module`."""
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("first_kd")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if not target.startswith("first_kd"):
                continue
            for alias in node.names:
                # `from first_kd.data import records` imports a module, not a name.
                sub = f"{target}.{alias.name}"
                if sub in MODULES:
                    found.append((sub, [], node.lineno))
                else:
                    found.append((target, [alias.name], node.lineno))
    return found


def _owner(target: str) -> str:
    """The first_kd module that holds `target` (a package's name resolves to its __init__)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def test_layers_import_only_downwards():
    problems = []
    for module in MODULES:
        layer = _layer(module)
        for target, _, line in _imports(module):
            target_layer = _layer(_owner(target) or target)
            if layer == "library" and target_layer != "library":
                problems.append(f"{module}:{line} (library) imports {target} ({target_layer})")
            if layer == "commands" and target_layer == "commands" and _owner(target) != "first_kd.commands" \
                    and _owner(target) != module:
                problems.append(f"{module}:{line} (a command) imports another command, {target}")
            if layer in ("commands", "demo") and target_layer == "demo" and layer != "demo":
                problems.append(f"{module}:{line} imports the demo ({target})")
            if layer == "demo" and target_layer == "commands":
                problems.append(f"{module}:{line} (demo) imports {target}: run commands through first_kd.cli")
    assert not problems, "\n".join(problems)


def test_no_private_name_crosses_a_module():
    problems = []
    for module, tree in TREES.items():
        aliases = {}  # local name -> first_kd module, for `import first_kd.x as y` / `from first_kd import x`
        for target, names, line in _imports(module):
            owner = _owner(target)
            for name in names:
                if name.startswith("_") and not name.startswith("__") and owner != module:
                    problems.append(f"{module}:{line} imports private {owner}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(module, node).startswith("first_kd"):
                for a in node.names:
                    full = f"{_resolve(module, node)}.{a.name}"
                    if full in MODULES:
                        aliases[a.asname or a.name] = full
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases.get(node.value.id, module) != module):
                problems.append(f"{module}:{node.lineno} reads private {aliases[node.value.id]}.{node.attr}")
    assert not problems, "\n".join(problems)


def test_no_function_over_100_lines():
    long = [f"{module}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines"
            for module, tree in TREES.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


def test_no_import_cycles():
    graph = {m: {_owner(t) for t, _, _ in _imports(m)} - {m, ""} for m in MODULES}
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    for m in graph:
        if MODULES[m].name == "__init__.py":
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("rule", ["layers", "private", "length", "cycles"])
def test_the_checker_catches_what_it_forbids(rule, tmp_path, monkeypatch):
    """Each rule fails on a small package built to break it (a checker that cannot fail proves nothing)."""
    pkg = tmp_path / "first_kd"
    (pkg / "commands").mkdir(parents=True)
    for f in ("__init__.py", "commands/__init__.py", "cli.py"):
        (pkg / f).write_text("")
    body = "\n".join(f"    x{i} = {i}" for i in range(101))
    sources = {
        "layers": {"store.py": "from first_kd.commands import cache\n", "commands/cache.py": ""},
        "private": {"a.py": "_secret = 1\n", "b.py": "from first_kd.a import _secret\n"},
        "length": {"a.py": f"def long():\n{body}\n"},
        "cycles": {"a.py": "import first_kd.b\n", "b.py": "from first_kd import a\n"},
    }[rule]
    for name, text in sources.items():
        (pkg / name).write_text(text)
    modules = {_module_name(p, pkg): p for p in sorted(pkg.rglob("*.py"))}
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", modules)
    monkeypatch.setattr(sys.modules[__name__], "TREES", {n: ast.parse(p.read_text()) for n, p in modules.items()})
    check = {"layers": test_layers_import_only_downwards, "private": test_no_private_name_crosses_a_module,
             "length": test_no_function_over_100_lines, "cycles": test_no_import_cycles}[rule]
    with pytest.raises(AssertionError):
        check()
