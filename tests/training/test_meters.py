"""meters: the loss sums and the training clock that checkpoints carry across a resume."""

from __future__ import annotations

import time

import pytest
import torch

from mnist_dist.training.meters import LossMeter, Position, Stopwatch


def test_the_loss_meter_sums_intervals_into_epochs():
    meter = LossMeter(torch.device("cpu"))
    for loss in (1.0, 3.0):
        meter.add(torch.tensor(loss))
    assert meter.interval_mean().item() == 2.0
    meter.end_interval()
    meter.add(torch.tensor(5.0))
    state = meter.state_dict()
    assert state == {"interval_loss": 5.0, "interval_steps": 1, "epoch_loss": 4.0, "epoch_steps": 2}
    restored = LossMeter(torch.device("cpu"))
    restored.load_state_dict(state)
    assert restored.end_epoch().item() == 3.0  # (1 + 3 + 5) / 3
    assert restored.state_dict() == {"interval_loss": 0.0, "interval_steps": 0, "epoch_loss": 0.0, "epoch_steps": 0}


def test_the_stopwatch_counts_training_and_not_its_pauses(monkeypatch):
    now = [100.0]  # a clock that moves only when told: the test does not depend on the machine's load
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    position = Position(train_seconds=1.0)
    clock = Stopwatch(position)
    clock.start()
    now[0] += 0.05
    with clock.paused():  # a checkpoint being written
        now[0] += 0.2
    now[0] += 0.05
    clock.stop()
    now[0] += 3.0
    clock.stop()  # stopping twice counts nothing more
    assert position.train_seconds == pytest.approx(1.1)
