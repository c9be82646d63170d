"""In-job restarts under torch's elastic launcher (``torchrun --max-restarts N``, ``accelerate
launch --max_restarts N``): what is worth a restart and what is not.

The launcher restarts the whole worker group after any failure, however certain it is to
recur. A lost or stalled rank is worth a restart (the group resumes from its newest
checkpoint); a bad config, missing data or a loss that diverges at the same step are not:
the rank that meets one ends the job at once instead of letting the launcher burn its
restarts on it. Imports no torch (the command line calls it).
"""

from __future__ import annotations

import os
import signal
import sys


def restarts_left() -> int:
    """How many more times the elastic launcher would restart this worker group (0 outside it)."""
    allowed = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0)
    done = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    return max(0, allowed - done)


def end_the_job(why: str) -> bool:
    """Stop the elastic launcher (this worker's parent) from restarting for an error that would recur.

    Returns whether it was told; it then stops every worker of this node and exits non-zero.
    """
    left = restarts_left()
    if not left:
        return False
    sys.stderr.write(
        f"{why} would fail the same way on every restart: ending the job instead of restarting it "
        f"({left} restart(s) left)\n"
    )
    sys.stderr.flush()
    try:
        os.kill(os.getppid(), signal.SIGTERM)
    except OSError:
        return False
    return True
