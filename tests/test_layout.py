"""The shape of the package, checked: imports go one way, the command line loads no torch,
functions fit on a screen, and the test tree mirrors the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "mnist_dist"

# Floors, from the bottom: a module imports only from its own floor or below. Within a
# floor, imports must not go round in a circle (checked separately).
FLOORS = [
    ("errors", "config", "runs", "runlock"),
    ("model", "data", "distributed"),
    ("tracking", "evaluation"),
    ("training", "inference", "preflight"),
    ("cli", "train", "evaluate", "doctor", "__init__"),
]
# Functions longer than this need a reason, given here.
MAX_FUNCTION_LINES = 40
LONGER_FUNCTIONS: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports_of(path: Path) -> set[str]:
    """The package modules a file imports, anywhere in it (inside functions too)."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("mnist_dist"):
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from . import verdicts` names a module
                candidate = ".".join([*target, alias.name])
                found.add(candidate if module_path(candidate) else ".".join(target))
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("mnist_dist.")}
    return {m for m in found if m and module_path(m)}


def module_path(name: str) -> Path | None:
    base = PACKAGE.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def floor_of(module: str) -> int:
    for level, names in reversed(list(enumerate(FLOORS))):
        if any(module == n or module.startswith(n + ".") for n in names):
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def test_imports_go_one_way():
    upward = [
        f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
        for a, targets in graph().items()
        for b in targets
        if floor_of(b) > floor_of(a)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges, cycles = graph(), []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif len(path) < 30:
                visit(nxt, path + [nxt])

    for start in sorted(edges):
        visit(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_the_command_line_loads_no_torch():
    code = (
        "import sys\nfrom mnist_dist.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'accelerate', 'wandb', 'PIL', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "Commands:" in out and out.strip().splitlines()[-1] == "[]", out


def test_functions_fit_on_a_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                name = f"{module_name(path)}.{node.name}"
                if lines > MAX_FUNCTION_LINES and name not in LONGER_FUNCTIONS:
                    long.append(f"{name}: {lines} lines")
    assert not long, "\n".join(long)


def test_the_tests_mirror_the_package():
    """Each module has its test file at the same place in tests/ (entry points and package files aside)."""
    skip = {"__init__", "train", "evaluate", "doctor"}  # thin `python -m` entry points, run by other tests
    missing = []
    for path in PACKAGE.rglob("*.py"):
        if path.stem in skip or path.stem.startswith("_"):
            continue
        expected = REPO / "tests" / path.relative_to(PACKAGE).parent / f"test_{path.stem}.py"
        if not expected.is_file():
            missing.append(str(expected.relative_to(REPO)))
    assert not missing, "\n".join(sorted(missing))
