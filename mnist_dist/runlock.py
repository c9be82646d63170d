"""One writer per run directory: a lock that the job's main process holds while it runs.

``RUN_DIR/.lock/`` is a directory (``mkdir`` is atomic on every filesystem, NFS included)
holding ``owner.json``: the holder's host, pid and process start time, its SLURM job and
restart count, when it took the lock, and a token. The holder renews a lease by touching
``owner.json`` every ``lease / 4`` seconds. A second command on the directory ends at once
with one line naming the holder; the lock is released on every exit path of the job.

A holder that is gone does not block anyone. It is recognised as gone when:

- it ran on this host and its process has ended (or its pid now names another process);
- it was an earlier attempt of this very SLURM job (a requeued job keeps its job id and
  counts its restarts; SLURM never runs two attempts at once);
- it ran on another host and its lease ran out (``lease`` seconds without a renewal, by
  the shared filesystem's own clock, so the nodes' clocks need not agree).

A stale lock is moved aside (``.lock.stale-TOKEN``) before a new one is made, so two
commands that find it stale at the same time cannot both take it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import RunDirBusyError

log = logging.getLogger("mnist_dist")

LOCK_DIR, OWNER_FILE = ".lock", "owner.json"
LEASE_SECONDS = 60.0


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None if that cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _ended(pid: Any, started: str | None) -> bool:
    """Whether process ``pid`` of this host, which started at ``started``, has ended."""
    if not isinstance(pid, int) or pid <= 0:
        return True
    if Path("/proc/self/stat").exists():  # the start time tells a reused pid apart
        now = _process_start(pid)
        return now is None or (started is not None and now != started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _attempt() -> list[int]:
    """Which attempt of its job this process is: SLURM's and torch's launcher's restart counts."""
    return [int(os.environ.get("SLURM_RESTART_COUNT") or 0), int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)]


def _identity() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "attempt": _attempt(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "token": uuid.uuid4().hex,
    }


def _filesystem_now(directory: Path) -> float:
    """The current time by the clock of the filesystem holding ``directory`` (its mtimes)."""
    probe = directory / f".clock-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def describe(owner: dict[str, Any]) -> str:
    """The holder of a lock, in words."""
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, since {owner.get('since')}"


def gone_because(owner: dict[str, Any], silent_for: float, lease: float) -> str | None:
    """Why the holder of a lock is gone, or None if it may still be running."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job_id") == job and list(owner.get("attempt") or [0, 0]) < _attempt():
        return "it was an earlier attempt of this job"
    if owner.get("host") == socket.gethostname():
        ended = _ended(owner.get("pid"), owner.get("process_start"))
        return f"its process {owner.get('pid')} has ended" if ended else None
    if silent_for > lease:
        return f"its lease ran out {silent_for - lease:.0f} s ago (no renewal for {silent_for:.0f} s)"
    return None


class RunLock:
    """The lock on one run directory; ``with RunLock(run_dir):`` holds it for the block."""

    def __init__(self, run_dir: str | os.PathLike, lease: float = LEASE_SECONDS) -> None:
        self.run_dir, self.lease = Path(run_dir), lease
        self.path = self.run_dir / LOCK_DIR
        self.owner: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise ``RunDirBusyError`` naming the live holder."""
        for _ in range(5):
            try:
                os.mkdir(self.path)
            except FileExistsError:
                self._take_over_if_gone()
                continue
            self.owner = _identity()
            written = self.path / f".{OWNER_FILE}.tmp"
            written.write_text(json.dumps(self.owner))
            os.replace(written, self.path / OWNER_FILE)  # a reader sees all of it or none
            self._renewer = threading.Thread(target=self._renew, name="run-dir-lease", daemon=True)
            self._renewer.start()
            return
        raise RunDirBusyError(f"{self.run_dir} is being locked by other commands at this moment; try again")

    def _holder(self) -> tuple[dict[str, Any], float]:
        """The holder's record and for how long its lease has not been renewed (seconds)."""
        owner_file = self.path / OWNER_FILE
        try:
            owner = json.loads(owner_file.read_text())
            renewed = owner_file.stat().st_mtime
        except FileNotFoundError:  # being made right now, or its maker died between mkdir and write
            return {}, _filesystem_now(self.run_dir) - self.path.stat().st_mtime
        except (OSError, ValueError):
            return {}, 0.0
        return owner, _filesystem_now(self.run_dir) - renewed

    def _take_over_if_gone(self) -> None:
        """Move a stale lock aside (the caller then makes its own), or raise naming the live holder."""
        try:
            owner, silent_for = self._holder()
        except FileNotFoundError:  # released meanwhile
            return
        reason = gone_because(owner, silent_for, self.lease) if owner else None
        if reason is None and (owner or silent_for <= self.lease):
            holder = describe(owner) if owner else "a command starting at this moment"
            raise RunDirBusyError(
                f"{self.run_dir} is in use by another run ({holder}); wait for it to end, or use another "
                f"--output-dir (if that process is gone for good, delete {self.path})"
            )
        log.warning("%s: taking over the lock of %s: %s", self.run_dir, describe(owner), reason or "never completed")
        aside = self.path.with_name(f"{LOCK_DIR}.stale-{owner.get('token', uuid.uuid4().hex)}")
        try:
            os.rename(self.path, aside)
        except OSError:  # another command moved it first
            return
        moved = json.loads((aside / OWNER_FILE).read_text()) if (aside / OWNER_FILE).is_file() else {}
        if moved.get("token") != owner.get("token"):  # not the lock judged stale but a new one: put it back
            try:
                os.rename(aside, self.path)
            except OSError:
                log.warning("%s: a lock moved aside by mistake is left as %s", self.run_dir, aside)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                os.utime(self.path / OWNER_FILE)
            except OSError as exc:
                log.warning("could not renew the lock on %s (%s)", self.run_dir, exc.strerror or exc)

    def release(self) -> None:
        """Give the lock up (if this object holds it), and remove stale locks moved aside."""
        if self.owner is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            if json.loads((self.path / OWNER_FILE).read_text()).get("token") == self.owner["token"]:
                shutil.rmtree(self.path, ignore_errors=True)
        except (OSError, ValueError):
            pass
        for aside in self.run_dir.glob(f"{LOCK_DIR}.stale-*"):
            shutil.rmtree(aside, ignore_errors=True)
        self.owner = None
