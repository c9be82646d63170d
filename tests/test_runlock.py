"""One writer per run directory: the lock refuses a live holder and takes over from one that is gone."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from mnist_dist.errors import RunDirBusyError
from mnist_dist.runlock import LOCK_DIR, OWNER_FILE, RunLock


def plant(run_dir, age: float = 0.0, **owner) -> None:
    """A lock as another command left it, last renewed ``age`` seconds ago."""
    lock = run_dir / LOCK_DIR
    lock.mkdir(parents=True)
    record = {"host": "node-elsewhere", "pid": 4242, "since": "earlier", "token": "t0", "attempt": [0, 0], **owner}
    (lock / OWNER_FILE).write_text(json.dumps(record))
    then = time.time() - age
    os.utime(lock / OWNER_FILE, (then, then))


def test_a_second_command_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirBusyError) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "another --output-dir" in message
        assert "\n" not in message
    assert not (tmp_path / LOCK_DIR).exists()  # released
    with RunLock(tmp_path):  # and free again
        pass


def test_a_lock_whose_process_ended_on_this_host_is_taken_over(tmp_path, caplog):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    plant(tmp_path, host=socket.gethostname(), pid=int(ended.stdout), process_start="1")
    with caplog.at_level(logging.WARNING, logger="mnist_dist"), RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_DIR / OWNER_FILE).read_text())["token"] == lock.owner["token"]
    assert f"its process {int(ended.stdout)} has ended" in caplog.text


def test_a_live_process_of_this_host_keeps_its_lock_and_a_reused_pid_does_not(tmp_path):
    from mnist_dist.runlock import _process_start

    plant(tmp_path, host=socket.gethostname(), pid=os.getppid(), process_start=_process_start(os.getppid()))
    with pytest.raises(RunDirBusyError, match=f"pid {os.getppid()}"):
        RunLock(tmp_path).acquire()
    record = json.loads((tmp_path / LOCK_DIR / OWNER_FILE).read_text())
    (tmp_path / LOCK_DIR / OWNER_FILE).write_text(json.dumps({**record, "process_start": "1"}))  # another process
    with RunLock(tmp_path):
        pass


def test_another_hosts_lock_holds_while_its_lease_is_renewed(tmp_path, caplog):
    plant(tmp_path, age=5)
    with pytest.raises(RunDirBusyError, match="pid 4242 on node-elsewhere"):
        RunLock(tmp_path, lease=60).acquire()
    os.utime(tmp_path / LOCK_DIR / OWNER_FILE, (time.time() - 200, time.time() - 200))
    with caplog.at_level(logging.WARNING, logger="mnist_dist"), RunLock(tmp_path, lease=60):
        pass
    assert "its lease ran out" in caplog.text
    assert not list(tmp_path.glob(f"{LOCK_DIR}*"))  # the stale one moved aside, then removed


def test_an_earlier_attempt_of_the_same_slurm_job_never_blocks_its_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    plant(tmp_path, slurm_job_id="77", attempt=[1, 0])  # this attempt, on another node: a second job step
    with pytest.raises(RunDirBusyError, match="SLURM job 77"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK_DIR / OWNER_FILE).unlink()
    (tmp_path / LOCK_DIR).rmdir()
    plant(tmp_path, slurm_job_id="77", attempt=[0, 0])  # the attempt before the requeue, renewed a moment ago
    with RunLock(tmp_path):
        pass


def test_a_lock_left_half_made_is_busy_at_first_and_stale_after_the_lease(tmp_path):
    (tmp_path / LOCK_DIR).mkdir()
    with pytest.raises(RunDirBusyError, match="a command starting at this moment"):
        RunLock(tmp_path, lease=60).acquire()
    os.utime(tmp_path / LOCK_DIR, (time.time() - 200, time.time() - 200))
    with RunLock(tmp_path, lease=60):
        assert (tmp_path / LOCK_DIR / OWNER_FILE).is_file()


def test_the_holder_renews_its_lease(tmp_path):
    with RunLock(tmp_path, lease=0.2):
        owner = tmp_path / LOCK_DIR / OWNER_FILE
        os.utime(owner, (time.time() - 100, time.time() - 100))
        deadline = time.monotonic() + 5
        while time.time() - owner.stat().st_mtime > 50 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.time() - owner.stat().st_mtime < 50
