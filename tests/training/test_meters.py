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
    clock = Stopwatch(position, torch.device("cpu"))
    clock.start()
    now[0] += 0.05
    with clock.paused():  # a checkpoint being written
        now[0] += 0.2
    now[0] += 0.05
    clock.stop()
    now[0] += 3.0
    clock.stop()  # stopping twice counts nothing more
    assert position.train_seconds == pytest.approx(1.1)


def test_the_warm_up_is_timed_apart_with_the_device_synchronised(monkeypatch):
    from mnist_dist.training import meters

    now, synced = [0.0], []
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(meters, "synchronize", lambda device: synced.append(now[0]))  # a GPU's queue: mocked
    position = Position()
    clock = Stopwatch(position, torch.device("cuda"), warmup_steps=2)
    clock.start()
    for seconds in (5.0, 1.0, 0.1, 0.1, 0.1):  # compilation, a slower second step, then steady steps
        now[0] += seconds
        clock.step_done()
    assert synced == [5.0, 6.0]  # after each warm-up step only: none per steady step
    with clock.paused():  # a checkpoint: counted in neither
        now[0] += 9.0
    now[0] += 0.1
    clock.step_done()
    clock.stop()  # the epoch's end: synchronised before the clock is read
    assert synced[-1] == now[0] and len(synced) == 4
    assert (position.warmup_steps, position.warmup_seconds) == (2, pytest.approx(6.0))
    assert position.train_seconds == pytest.approx(6.4)
    assert meters.steady_step_seconds(Position(step=6, **_timed(position))) == pytest.approx(0.1)


def test_each_start_warms_up_again_and_a_short_run_is_all_warm_up(monkeypatch):
    from mnist_dist.training import meters

    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    position = Position(step=100, train_seconds=20.0, warmup_steps=10, warmup_seconds=4.0)  # from a checkpoint
    clock = Stopwatch(position, torch.device("cpu"), warmup_steps=10)
    clock.start()
    for _ in range(3):  # stopped after 3 steps: every one of them was warm-up
        now[0] += 1.0
        clock.step_done()
    clock.stop()
    assert (position.warmup_steps, position.warmup_seconds, position.train_seconds) == (13, 7.0, 23.0)
    assert meters.steady_step_seconds(Position(step=103, **_timed(position))) == pytest.approx(16.0 / 90)
    assert meters.steady_step_seconds(Position(step=3, train_seconds=3.0, warmup_steps=3, warmup_seconds=3.0)) is None


def _timed(position: Position) -> dict:
    return {k: getattr(position, k) for k in ("train_seconds", "warmup_steps", "warmup_seconds")}


def test_synchronize_waits_for_the_device_it_is_given(monkeypatch):
    from mnist_dist.training.meters import synchronize

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)  # a GPU's queue: mocked
    synchronize(torch.device("cpu"))  # nothing queued on the CPU: nothing to wait for
    synchronize(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]
