"""In-job restarts: an error that would recur stops torch's elastic launcher instead of being restarted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from mnist_dist.distributed.restarts import end_the_job, restarts_left

from conftest import REPO


def test_restarts_left_counts_what_the_launcher_would_still_do(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restarts_left() == 0 and end_the_job("this error") is False  # not under the launcher: nothing to do
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restarts_left() == 2
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    assert restarts_left() == 0


LAUNCHER = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    told = []
    signal.signal(signal.SIGTERM, lambda *_: told.append(True))
    env = {**os.environ, "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "0"}
    worker = [sys.executable, "-c", "from mnist_dist.distributed.restarts import end_the_job as e; print(e('bad'))"]
    out = subprocess.run(worker, env=env, capture_output=True, text=True)
    print(out.stdout.strip(), out.stderr.strip(), "told" if told else "not told", sep="|")
    """
)


def test_the_worker_tells_its_launcher_to_end_the_job():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LAUNCHER], capture_output=True, text=True, env=env, timeout=60)
    printed, said, told = done.stdout.strip().split("|")
    assert printed == "True" and told == "told", done
    assert (
        said
        == "bad would fail the same way on every restart: ending the job instead of restarting it (3 restart(s) left)"
    )
