"""collectives: the exchange the doctor checks and times. On one process here; on two real
processes through ``accelerate launch`` in tests/preflight/test_doctor.py."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from accelerate import Accelerator

from mnist_dist.preflight.collectives import _exchange_is_correct, _median_seconds, check_collectives, step_seconds
from mnist_dist.preflight.facts import OK


def test_one_process_has_nothing_to_exchange():
    check, figures = check_collectives(Accelerator(cpu=True), (256,), 64)
    assert (check.name, check.status, check.detail) == ("collectives", OK, "one process: nothing to exchange")
    assert figures == {"world_size": 1}


def test_the_exchange_of_one_process_returns_its_own_values():
    assert _exchange_is_correct(Accelerator(cpu=True)) is None


def test_timings_are_medians_after_a_warm_up(monkeypatch):
    now = [0.0]  # a clock that moves only by the calls' own durations
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    delays = itertools.chain([0.2] * 3, [0.01, 0.05, 0.02, 0.01, 0.09])  # 3 slow warm-up calls, then 5 timed

    def call():
        now[0] += next(delays)

    assert _median_seconds(call, repeats=5, sync=lambda: None) == pytest.approx(0.02)


def test_a_training_step_is_timed_on_this_process():
    small = step_seconds((256,), 8, torch.device("cpu"), lambda: None)
    large = step_seconds((256,), 4096, torch.device("cpu"), lambda: None)
    assert 0 < small < large
