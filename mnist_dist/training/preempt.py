"""Stopping on a signal: every rank stops at the same step, saves a checkpoint, and exits.

SIGTERM (a plain ``kill``, ``scancel``, torchrun passing on its own SIGTERM), SIGUSR1
(what ``sbatch --signal=USR1@SECONDS`` sends before the time limit) and SIGINT (Ctrl-C;
a second Ctrl-C stops at once) only set a flag.
The training loop shares the flags of all ranks at its next log interval or epoch end,
in the same all-reduce that averages the loss, so all ranks see the same verdict at the
same step with no extra collective. Under SLURM, a stop by SIGUSR1 then requeues the job
(``scontrol requeue``), and the restarted job resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

log = logging.getLogger("mnist_dist")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlags:
    """Installs handlers for SIGTERM and SIGUSR1 that record the signal (main thread only)."""

    def __init__(self) -> None:
        self.received: dict[int, bool] = {s: False for s in SIGNALS}
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # only sets a flag: safe at any point of the loop
        if signum == signal.SIGINT and self.received[signum]:
            raise KeyboardInterrupt  # Ctrl-C twice: stop at once, without waiting for the checkpoint
        self.received[signum] = True

    def local(self) -> list[float]:
        """This rank's flags, in ``SIGNALS`` order, for the all-reduce."""
        return [1.0 if self.received[s] else 0.0 for s in SIGNALS]

    @staticmethod
    def verdict(summed: list[float]) -> int | None:
        """The signal all ranks stop for, from the flags summed over ranks: SIGUSR1 wins (it asks for a
        requeue), then SIGTERM, then SIGINT (Ctrl-C)."""
        flags = dict(zip(SIGNALS, summed))
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            if flags[sig] > 0:
                return sig
        return None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def requeue_slurm_job() -> bool:
    """Requeue this SLURM batch job (``scontrol requeue``); False, with a warning, if that is not possible."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not requeue SLURM job %s (%s); resubmit it to resume", job, exc)
        return False
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed (%s); resubmit the job to resume", job, done.stderr.strip())
        return False
    log.info("SLURM job %s requeued: it resumes from the checkpoint when it starts again", job)
    return True
