"""Waiting with a bound: a call given up at a deadline, stop signals that end a wait, and the
C++ output of torch kept off the terminal while it waits (for :mod:`.rendezvous`)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def time_left(deadline: float, at_least: float) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value), but at least ``at_least``."""
    return max(at_least, deadline - time.monotonic())


def call_before(deadline: float, make):
    """``make()`` in a thread, waited for until ``deadline`` (torch's store client retries past its timeout)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = make()
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, name="bounded-call", daemon=True)
    thread.start()
    thread.join(time_left(deadline, 0.1))
    if thread.is_alive():
        raise TimeoutError("no answer")
    if "error" in result:
        raise result["error"]
    return result["value"]


class Signalled(Exception):
    """A stop signal arrived during a wait; ``name`` is the signal's (SIGTERM, SIGINT), ``signum`` its number."""

    def __init__(self, signum: int) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(self.name)


def _raise_signalled(signum: int, frame) -> None:
    raise Signalled(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While waiting, SIGTERM/SIGINT (a scheduler ending the job step) end the wait with the one line."""
    old = {s: signal.signal(s, _raise_signalled) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextmanager
def stderr_to_debug_log(name: str) -> Iterator[Path]:
    """Send what is written to file descriptor 2 (torch's C++ retries and stack dumps) to a file
    in the temporary directory named after ``name`` and this process, not the terminal.

    Yields the file's path; it is removed again if nothing was written.
    """
    path = Path(tempfile.gettempdir()) / f"{name}-{os.getpid()}.log"
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if path.stat().st_size == 0:
            path.unlink(missing_ok=True)


def where_written(debug_log: Path) -> str:
    """Where torch's own messages went, if it wrote any."""
    try:
        return f" (torch's messages: {debug_log})" if debug_log.stat().st_size else ""
    except OSError:
        return ""
