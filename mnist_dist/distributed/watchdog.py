"""Naming the rank that holds a run up: every rank publishes its progress, and every rank judges.

The training loop marks where its rank is (``mark(phase, step)``: an assignment, no I/O).
A daemon thread of each rank publishes that, with a heartbeat, every ``interval`` seconds
to ``RUN_DIR/.progress/rank-N.json``: a file per rank on the run directory's shared
filesystem, a channel that depends on no collective and on no process hosting it. The same
thread reads every rank's file and, by its own monotonic clock (the nodes' clocks need not
agree), judges:

- a rank is **silent** when its heartbeat has not changed for ``stall_timeout`` seconds:
  its process is stopped, hung below Python, or its node is gone;
- the run is **stalled** when no rank's progress has moved for ``stall_timeout``: while
  one still progresses, the others wait for it (a rank whose shard of an evaluation took
  longer). The ranks named are the silent ones, or, if none is, the live ranks furthest
  behind (a rank waiting in a collective for a late peer is a victim, not the cause).

On a stall every live rank writes the Python stacks of all its threads to
``RUN_DIR/stalls/step-N/rank-R.txt`` and exits with status ``STALLED_EXIT``; the lowest live
rank first prints one line naming the stalled rank(s), and kills the silent ones of its own
host (they cannot finish; the launcher would kill them after its grace). The launcher ends the rest.
When a collective fails because a peer died, ``lost_peers`` names it (see ``training/job.py``).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("mnist_dist")

PROGRESS_DIR, STALLS_DIR = ".progress", "stalls"
# A rank's phases in the order a step goes through them: of two ranks at the same step, the
# one at an earlier phase is behind. "finished": the rank is done and no longer judged.
# In the order a rank goes through them; "evaluated": its shard is done, it waits for the others'.
PHASES = ("start", "data", "compute", "collective", "evaluation", "evaluated", "checkpoint", "finished")
STALLED_EXIT = 3  # documented in docs/troubleshooting.md ("Exit codes")


def _alive_here(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not Path(f"/proc/{pid}/status").is_file() or "zombie" not in Path(f"/proc/{pid}/status").read_text()


@dataclass
class Peer:
    """What this rank last read of one rank's file, and when it last changed (monotonic seconds)."""

    record: dict[str, Any] = field(default_factory=dict)
    beat_seen: float = 0.0
    progress_seen: float = 0.0

    def describe(self, now: float) -> str:
        r = self.record
        return (
            f"rank {r.get('rank')} (pid {r.get('pid')} on {r.get('host')}) at step {r.get('step')}, "
            f"phase {r.get('phase')}, no progress for {now - self.progress_seen:.0f} s"
        )


class Watchdog:
    """Publishes this rank's progress and ends the rank, naming the culprit, when the run stalls."""

    def __init__(self, run_dir: Path, rank: int, world: int, stall_timeout: float, interval: float | None = None):
        self.dir, self.rank, self.world, self.timeout = Path(run_dir) / PROGRESS_DIR, rank, world, stall_timeout
        self.run_dir = Path(run_dir)
        self.interval = interval or min(1.0, max(0.1, stall_timeout / 10))
        self.before_exit: list[Callable[[], None]] = []
        self._where = (0, 0, "start")  # (progress count, step, phase): replaced whole, read by the thread
        self._beat = 0
        self._peers: dict[int, Peer] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._identity = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}

    def mark(self, phase: str, step: int | None = None) -> None:
        """This rank is now in ``phase`` (at ``step``, or the same step as before): progress."""
        count, last_step, _ = self._where
        self._where = (count + 1, last_step if step is None else step, phase)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        self._peers = {r: Peer(beat_seen=start, progress_seen=start) for r in range(self.world)}
        self._publish()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """This rank is done: say so (peers stop judging it) and stop watching."""
        if self._thread is None:
            return
        self.mark("finished")
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._publish()

    def _publish(self) -> None:
        count, step, phase = self._where
        self._beat += 1
        record = {**self._identity, "beat": self._beat, "progress": count, "step": step, "phase": phase}
        path = self.dir / f"rank-{self.rank}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError as exc:  # a full or unreachable filesystem must not stop training
            log.debug("could not publish progress to %s: %s", path, exc)

    def _read(self, now: float) -> None:
        for rank, peer in self._peers.items():
            try:
                record = json.loads((self.dir / f"rank-{rank}.json").read_text())
            except (OSError, ValueError):
                continue
            if record.get("beat") != peer.record.get("beat") or record.get("pid") != peer.record.get("pid"):
                peer.beat_seen = now
            if record.get("progress") != peer.record.get("progress") or record.get("pid") != peer.record.get("pid"):
                peer.progress_seen = now
            peer.record = record

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._publish()
            now = time.monotonic()
            self._read(now)
            culprits, silent = self.judge(now)
            if culprits:
                self._end(culprits, silent, now)

    def judge(self, now: float) -> tuple[list[int], bool]:
        """``(the ranks that stall the run, whether they are silent)``; no ranks while it goes on."""
        judged = {r: p for r, p in self._peers.items() if p.record.get("phase") != "finished"}
        silent = [r for r, p in judged.items() if r != self.rank and now - p.beat_seen > self.timeout]
        if silent:
            return silent, True
        if any(now - p.progress_seen <= self.timeout for p in judged.values()):
            return [], False  # someone still progresses: the others wait for it (e.g. a slower evaluation)

        def position(r: int) -> tuple[int, int]:
            record = judged[r].record
            return record.get("step", 0), PHASES.index(record.get("phase", "start"))

        behind = min(position(r) for r in judged)
        return [r for r in judged if position(r) == behind], False

    def _end(self, culprits: list[int], silent: bool, now: float) -> None:
        """Write this rank's stacks, let the lowest live rank name the culprits, and exit."""
        step = min(self._peers[r].record.get("step", 0) for r in culprits)
        where = self.run_dir / STALLS_DIR / f"step-{step:08d}"
        try:
            where.mkdir(parents=True, exist_ok=True)
            with open(where / f"rank-{self.rank}.txt", "w") as fh:
                faulthandler.dump_traceback(fh, all_threads=True)
        except OSError as exc:
            where = Path(f"(not written: {exc.strerror or exc})")
        live = [r for r in range(self.world) if not (silent and r in culprits)]
        if self.rank == min(live):
            how = "silent: stopped, hung below Python, or its node lost" if silent else "alive but not progressing"
            named = "; ".join(self._peers[r].describe(now) for r in culprits)
            sys.stderr.write(
                f"Error: the run stalled: {named} ({how}); stacks of the live ranks in {where}; "
                f"every rank ends (exit status {STALLED_EXIT}); the same command resumes from the last checkpoint\n"
            )
            sys.stderr.flush()
            if silent:
                self._kill_silent_here(culprits)
        for action in self.before_exit:
            try:
                action()
            except Exception:  # the exit must happen whatever a clean-up does
                pass
        os._exit(STALLED_EXIT)

    @property
    def step(self) -> int:
        """The step this rank last marked."""
        return self._where[1]

    def _kill_silent_here(self, culprits: list[int]) -> None:
        """End the silent culprits of this host now: a stopped or wedged process cannot finish, and the
        launcher would otherwise wait its grace (30 s) for it before killing it all the same."""
        for rank in culprits:
            record = self._peers[rank].record
            if record.get("host") == self._identity["host"] and isinstance(record.get("pid"), int):
                try:
                    os.kill(record["pid"], signal.SIGKILL)
                except OSError:
                    pass

    def lost_peers(self, wait: float) -> dict[int, str]:
        """After a collective failed: the ranks whose process has ended, each described, waiting up
        to ``wait`` seconds for a remote peer's heartbeat to stop."""
        deadline = time.monotonic() + wait
        while True:
            now = time.monotonic()
            self._read(now)
            lost = {}
            for rank, peer in self._peers.items():
                r = peer.record
                if rank == self.rank or r.get("phase") == "finished" or not r:
                    continue
                gone_here = r.get("host") == self._identity["host"] and not _alive_here(int(r.get("pid", 0)))
                if gone_here or now - peer.beat_seen > 2.5 * self.interval + 0.5:
                    where = f"pid {r.get('pid')} on {r.get('host')}, last seen at step {r.get('step')}"
                    lost[rank] = f"rank {rank} ({where})"
            if lost or now > deadline:
                return lost
            time.sleep(self.interval / 2)


class Unwatched:
    """The watchdog's stand-in where there is none (one process, or ``stall_timeout: 0``)."""

    step = 0

    def __init__(self) -> None:
        self.before_exit: list[Callable[[], None]] = []

    def mark(self, phase: str, step: int | None = None) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def lost_peers(self, wait: float) -> dict[int, str]:
        return {}


def watchdog_for(run_dir: Path, rank: int, world: int, stall_timeout: float) -> Watchdog | Unwatched:
    """A watchdog for a run of several processes with a ``stall_timeout``; else its stand-in."""
    return Watchdog(run_dir, rank, world, stall_timeout) if stall_timeout and world > 1 else Unwatched()
