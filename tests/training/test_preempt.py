"""Stopping on a signal: the flag, the vote over ranks, and the requeue under SLURM."""

import logging
import os
import signal
import stat

import pytest

from mnist_dist.training.preempt import StopFlags, requeue_slurm_job


def test_a_signal_only_sets_a_flag_until_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    flags = StopFlags()
    try:
        assert flags.local() == [0.0, 0.0, 0.0]
        os.kill(os.getpid(), signal.SIGUSR1)  # a real signal: the process goes on
        assert flags.local() == [0.0, 1.0, 0.0]
    finally:
        flags.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_ctrl_c_once_asks_for_the_checkpoint_and_twice_stops_at_once():
    flags = StopFlags()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flags.local() == [0.0, 0.0, 1.0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flags.restore()


def test_the_ranks_agree_on_one_verdict_and_a_requeue_wins():
    assert StopFlags.verdict([0.0, 0.0, 0.0]) is None
    assert StopFlags.verdict([2.0, 0.0, 0.0]) == signal.SIGTERM  # summed over 2 ranks
    assert StopFlags.verdict([1.0, 1.0, 1.0]) == signal.SIGUSR1  # one rank asked for a requeue
    assert StopFlags.verdict([1.0, 0.0, 1.0]) == signal.SIGTERM  # a scheduler's stop before a Ctrl-C
    assert StopFlags.verdict([0.0, 0.0, 1.0]) == signal.SIGINT


def test_requeue_outside_slurm_does_nothing(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_slurm_job() is False


@pytest.mark.slow  # runs a stand-in scontrol
def test_a_failed_requeue_is_a_warning_saying_to_resubmit(monkeypatch, tmp_path, caplog):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with caplog.at_level(logging.WARNING, logger="mnist_dist"):
        assert requeue_slurm_job() is False
    assert "scontrol requeue 4242 failed (Invalid job id specified); resubmit the job to resume" in caplog.text
