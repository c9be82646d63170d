"""Progress: a bar on a terminal, a few plain lines per epoch elsewhere, nothing on other ranks."""

from __future__ import annotations

import io
import re

import pytest

from mnist_dist.training.progress import LINES_PER_EPOCH, ProgressDisplay

from conftest import run_cli


def _epoch(display: ProgressDisplay, steps: int, log_every: int, epoch: int = 1) -> None:
    display.start_epoch(epoch, 2, steps)
    for step in range(1, steps + 1):
        display.advance()
        if step % log_every == 0:
            display.interval(step, 0.25, log_every)
    display.end_epoch()


@pytest.mark.parametrize("log_every", [1, 7, 100])
def test_plain_output_is_a_few_lines_per_epoch(caplog, log_every):
    stream = io.StringIO()
    display = ProgressDisplay(True, 64, stream=stream, interactive=False)
    with caplog.at_level("INFO", logger="mnist_dist"):
        _epoch(display, 938, log_every)
        _epoch(display, 938, log_every, epoch=2)
    lines = [r.getMessage() for r in caplog.records]
    assert stream.getvalue() == ""
    assert 2 <= len(lines) <= 2 * (LINES_PER_EPOCH - 1)
    assert re.fullmatch(r"epoch 1/2: step \d+/938 \(\d+%\), loss 0\.2500, \d+ samples/s", lines[0])


def test_a_terminal_gets_a_bar_with_loss_and_throughput():
    stream = io.StringIO()
    display = ProgressDisplay(True, 64, stream=stream, interactive=True)
    display.start_epoch(1, 3, 50)
    for step in range(1, 51):
        display.advance()
        if step % 10 == 0:
            assert display.interval(step, 0.5, 10) > 0
    display.end_epoch()
    text = stream.getvalue()
    assert "epoch 1/3" in text and "loss=0.5000" in text and "samples/s=" in text


def test_other_ranks_show_nothing(caplog):
    stream = io.StringIO()
    with caplog.at_level("INFO", logger="mnist_dist"):
        _epoch(ProgressDisplay(False, 64, stream=stream, interactive=True), 100, 10)
        _epoch(ProgressDisplay(False, 64, stream=stream, interactive=False), 100, 10)
    assert stream.getvalue() == "" and not caplog.records


def test_log_of_a_non_terminal_run_is_short(tmp_path, data_dir):
    """Through a pipe (as in SLURM or CI): a few lines per epoch, whatever log_every is.

    wandb on the path cannot even be imported here: tracker 'none' must not try.
    """
    broken = tmp_path / "broken" / "wandb"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('tracker none imported wandb')\n")
    proc = run_cli(
        [
            "mnist_dist.train",
            "--config",
            "configs/train/reference.yaml",
            "--cpu",
            "--epochs",
            "2",
            "--batch-size",
            "256",
            "--log-every",
            "5",
            "--hidden-sizes",
            "32",
            "--tracker",
            "none",
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(tmp_path / "run"),
        ],
        env={"PYTHONPATH": str(broken.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    for epoch in (1, 2):
        assert 2 <= sum(f"epoch {epoch}/2:" in line for line in lines) <= LINES_PER_EPOCH
    assert len(lines) <= 2 * LINES_PER_EPOCH + 3, lines
    assert not (tmp_path / "run" / "wandb").exists()
