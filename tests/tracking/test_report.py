"""Report: the three pictures of a run, drawn from its history and misclassified digits."""

from __future__ import annotations

import json

import pytest
import torch

from mnist_dist.config import build_config
from mnist_dist.errors import ReportError
from mnist_dist.runs import CONFUSION_FILE, CURVES_FILE, GRID_FILE, TIMING_FILE
from mnist_dist.tracking.report import write_report

pytest.importorskip("matplotlib")


@pytest.fixture
def finished_run(tmp_path, mnist_test):
    """A run directory written by the Tracker as training does: 3 epochs of 50 steps."""
    from accelerate import Accelerator

    from mnist_dist.evaluation import misclassified_examples
    from mnist_dist.tracking.tracker import Tracker

    images, labels = mnist_test
    cfg = build_config(None, {"output_dir": str(tmp_path), "tracker": "none", "epochs": 3})
    tracker = Tracker(cfg, Accelerator(cpu=True), tmp_path)
    tracker.start({**cfg.to_dict(), "world_size": 1})
    for step in range(10, 151, 10):
        tracker.log_step(step, {"train/loss": 2.0 / step**0.5, "lr": 0.5, "train/samples_per_second": 1e4})
        if step % 50 == 0:
            tracker.log_epoch(step, {"epoch": step // 50, "test/accuracy": 0.9 + step / 5000, "test/loss": 1 / step})
    predictions = labels.clone()
    predictions[::97] = (labels[::97] + 1) % 10  # 104 wrong answers, every 97th image
    confusion = torch.bincount(labels * 10 + predictions, minlength=100).reshape(10, 10)
    tracker.finish(
        {"test_accuracy": (predictions == labels).float().mean().item()},
        confusion,
        misclassified_examples(predictions, images, labels),
    )
    tracker.end()
    return tmp_path


def test_report_writes_three_pictures(finished_run):
    from PIL import Image

    paths = write_report(finished_run)
    assert [p.name for p in paths] == [CURVES_FILE, CONFUSION_FILE, GRID_FILE]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 400


def test_a_run_of_several_processes_also_gets_each_ranks_timing(finished_run):
    """history.jsonl as a 2-process run writes it: every rank's split of each interval."""
    from PIL import Image

    path = finished_run / "history.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        if r["kind"] == "step":
            r.update(
                {"ranks/data_s": [1e-4, 1e-4], "ranks/compute_s": [2e-3, 5e-3], "ranks/collective_s": [6e-3, 3e-3]}
            )
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = write_report(finished_run)
    assert [p.name for p in paths] == [CURVES_FILE, CONFUSION_FILE, GRID_FILE, TIMING_FILE]
    with Image.open(paths[-1]) as image:
        assert image.format == "PNG" and image.width >= 600


def test_report_needs_a_finished_run(tmp_path, finished_run):
    with pytest.raises(ReportError, match="history.jsonl does not exist"):
        write_report(tmp_path / "nothing-here")
    history = finished_run / "history.jsonl"
    lines = history.read_text().splitlines()
    history.write_text("\n".join(line for line in lines if json.loads(line)["kind"] != "summary") + "\n")
    with pytest.raises(ReportError, match="no final summary"):
        write_report(finished_run)


def test_report_command(finished_run, tmp_path):
    from click.testing import CliRunner

    from mnist_dist.cli import main

    result = CliRunner().invoke(main, ["report", str(finished_run)])
    assert result.exit_code == 0, result.output
    names = (CURVES_FILE, CONFUSION_FILE, GRID_FILE)
    assert result.output.splitlines() == [f"wrote {finished_run / name}" for name in names]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {empty / 'history.jsonl'} does not exist: pass the --output-dir of a training run"
    ]


def test_report_of_a_run_evaluated_on_a_validation_split(tmp_path, data_dir):
    """A --val-size run logs val/... instead of test/...; its report says so."""
    from conftest import run_cli

    proc = run_cli(
        [
            "mnist_dist.train",
            "--max-steps",
            "60",
            "--log-every",
            "10",
            "--val-size",
            "1000",
            "--tracker",
            "none",
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    paths = write_report(tmp_path)
    assert [p.name for p in paths] == [CURVES_FILE, CONFUSION_FILE, GRID_FILE]
