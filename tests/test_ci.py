"""CI is never silently green: under CI=true a test whose dependency is missing fails, naming it."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

NEEDS_SOMETHING = """
from conftest import skip_or_fail

def test_needs_a_package_that_is_not_here():
    skip_or_fail("package frobnicate not installed (pip install frobnicate)")
"""


def run_pytest(tmp_path, ci: str | None):
    (tmp_path / "test_needs.py").write_text(NEEDS_SOMETHING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_needs.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_a_missing_dependency_is_a_skip_with_its_reason_outside_ci(tmp_path):
    proc = run_pytest(tmp_path, ci=None)
    assert proc.returncode == 0, proc.stdout
    assert "SKIPPED [1]" in proc.stdout and "package frobnicate not installed (pip install frobnicate)" in proc.stdout


def test_under_ci_a_missing_dependency_fails_and_names_it(tmp_path):
    proc = run_pytest(tmp_path, ci="true")
    assert proc.returncode == 1, proc.stdout
    assert "CI=true, and a test dependency is missing: package frobnicate not installed" in proc.stdout


def test_the_ci_script_sets_ci_and_installs_what_the_tests_need():
    text = (REPO / ".ci/run").read_text()
    assert "export CI=true" in text
    for package in ("dataset-fashion-mnist", "slurmctld slurmd slurm-client munge", '".[onnx]"'):
        assert package in text
    subprocess.run(["bash", "-n", str(REPO / ".ci/run")], check=True)
