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


@pytest.mark.slow  # bench/gpu.py starts the variants' processes
def test_the_device_benchmark_reports_every_variant_whatever_fails(tmp_path, data_dir, capsys):
    """bench/gpu.py on the CPU (--allow-cpu, few steps): a variant that fails or times out is one line,
    and the next ones still run; summary.json holds them all. Without the data it names what is missing."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu
    finally:
        sys.path.remove(str(REPO / "bench"))
    variants = [("eager", [], 120), ("broken", ["--lr", "-1"], 120), ("stuck", ["--max-steps", "100000"], 3)]
    variants.append(("floor", None, 120))
    args = [str(tmp_path / "out"), "--allow-cpu", "--max-steps", "20", "--data-dir", str(data_dir)]
    assert gpu.main(args, variants) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["eager", "broken", "stuck", "floor"], lines
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    got = {v["variant"]: v for v in summary["variants"]}
    assert got["eager"]["status"] == "ok" and got["eager"]["steps"] == 20 and got["eager"]["device"] == "cpu"
    assert got["broken"]["status"] == "failed (exit 2)"
    assert "config key 'lr'" in (tmp_path / "out/broken.log").read_text()
    assert got["stuck"]["status"] == "timed out after 3 s" and got["floor"]["status"] == "ok"
    assert 0 < got["floor"]["accuracy"] <= 1
    for variant in ("eager", "floor"):  # the warm-up apart from the steady time per step
        assert 0 < got[variant]["warmup_seconds"] < got[variant]["train_seconds"], got[variant]
        assert 0 < got[variant]["steady_step_seconds"] < got[variant]["train_seconds"] / 10, got[variant]
    assert gpu.main([str(tmp_path / "none"), "--data-dir", str(tmp_path / "no-data")]) == 1  # nothing is run
    missing = json.loads((tmp_path / "none/summary.json").read_text())["missing"]
    assert len(missing) == 4 and all("carry the MNIST IDX files" in m for m in missing)
