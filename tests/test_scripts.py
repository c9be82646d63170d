"""bench/, scripts/, launch/, the pages and docstrings name the package's modules: every name exists.

These files run outside the test suite (benchmarks, figure makers, job scripts), so a moved
module would break them silently; this reads them and resolves every name instead.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(REPO / "bench").glob("*.py"), *(REPO / "scripts").glob("*.py")])
TEXTS = sorted(
    [
        REPO / "README.md",
        REPO / "Makefile",
        REPO / "pyproject.toml",
        *(REPO / "mnist_dist").rglob("*.py"),
        *(REPO / "docs").glob("*.md"),
        *(REPO / "launch").iterdir(),
        *(REPO / "bench").glob("*.sh"),
        *(REPO / "bench").glob("*.md"),
    ]
)
DOTTED = re.compile(r"\bmnist_dist(?:\.[A-Za-z_]\w*)+")


def package_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every ``from mnist_dist... import name`` and ``import mnist_dist...``, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mnist_dist":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "mnist_dist"]
    return found


def resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` is a module, or an attribute path below the longest module prefix of it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                try:
                    obj = importlib.import_module(f"{obj.__name__}.{attr}")
                except (ImportError, AttributeError):
                    return False
            else:
                obj = getattr(obj, attr)
        return True
    return False


def test_there_are_files_to_check():
    assert {"run.py", "checkpoint_cost.py", "make_predict_figure.py"} <= {p.name for p in SCRIPTS}
    assert sum(len(DOTTED.findall(p.read_text())) for p in TEXTS if p.is_file()) > 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_package_name_a_script_imports_exists(script):
    missing = [
        f"{module}.{name}" if name else module
        for module, name in package_imports(script)
        if not resolves(f"{module}.{name}" if name else module)
    ]
    assert not missing, f"{script.relative_to(REPO)} imports what the package no longer has: {missing}"


@pytest.mark.parametrize("text", [p for p in TEXTS if p.is_file()], ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_a_page_or_job_script_names_exists(text):
    missing = sorted({name for name in DOTTED.findall(text.read_text()) if not resolves(name)})
    assert not missing, f"{text.relative_to(REPO)} names what the package does not have: {missing}"
