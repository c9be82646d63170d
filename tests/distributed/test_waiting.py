"""waiting: calls given up at a deadline, stop signals that end a wait, fd 2 kept off the terminal."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from mnist_dist.distributed.waiting import (
    Signalled,
    call_before,
    stderr_to_debug_log,
    stop_on_signals,
    time_left,
    where_written,
)


def test_a_call_that_outlives_the_deadline_is_given_up():
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no answer"):
        call_before(time.monotonic() + 0.5, lambda: release.wait(30))
    assert 0.4 < time.monotonic() - start < 3
    release.set()


def test_a_call_within_the_deadline_returns_or_raises_its_own():
    assert call_before(time.monotonic() + 5, lambda: 42) == 42

    def broken():
        raise RuntimeError("connection refused\n  frame 1\n  frame 2")

    with pytest.raises(RuntimeError) as info:
        call_before(time.monotonic() + 5, broken)
    assert str(info.value).startswith("connection refused")


def test_time_left_never_goes_below_its_floor():
    assert time_left(time.monotonic() - 10, 1) == 1
    assert 9 < time_left(time.monotonic() + 10, 1) <= 10


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_wait_and_the_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with pytest.raises(Signalled) as info, stop_on_signals():
        os.kill(os.getpid(), sig)
        time.sleep(5)  # interrupted at once
    assert info.value.name == sig.name
    assert signal.getsignal(sig) is before


def test_what_is_written_to_fd_2_goes_to_the_debug_log(capfd):
    with stderr_to_debug_log("mnist-dist-test") as quiet:
        pass
    assert not quiet.exists() and where_written(quiet) == ""  # nothing written: no file left
    with stderr_to_debug_log("mnist-dist-test") as log:
        os.write(2, b"[c10d] retrying connect (as torch's C++ code writes it)\n")
    try:
        assert capfd.readouterr().err == ""
        assert log.read_text() == "[c10d] retrying connect (as torch's C++ code writes it)\n"
        assert where_written(log) == f" (torch's messages: {log})"
        os.write(2, b"back on the terminal\n")
        assert capfd.readouterr().err == "back on the terminal\n"
    finally:
        log.unlink()
