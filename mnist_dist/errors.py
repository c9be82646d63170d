"""What ends a command early: user-facing errors, and a stop on a signal.

Every error a user can fix is a ``UserError``: its message says what is wrong and what to
do, and the command line prints it as one ``Error:`` line, with no traceback. Each kind
also derives from the built-in exception it refines, so ``except ValueError`` still
catches a bad config. This module imports nothing, so any module, the command line
included, can use it without loading torch.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """An error whose message is the whole story: shown as one ``Error:`` line, exit status 1."""

    exit_code = 1
    quiet = False  # True: exit with the status, the line being said by another process of the job
    recurs = True  # the same command would fail the same way again (no point in restarting it)


class ConfigError(UserError, ValueError):
    """A configuration problem, described in one line that names the key. A usage error: exit status 2."""

    exit_code = 2


class DataError(UserError, RuntimeError):
    """The dataset is missing, corrupt or could not be fetched; the message says how to fix it."""


class RunDirError(UserError, OSError):
    """The run directory cannot be used; the message says why and what to do."""


class RunDirBusyError(RunDirError):
    """Another run holds the run directory's lock; the message names it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the command needs (weights, a run directory's model) does not exist."""


class WeightsError(UserError, ValueError):
    """A file is not weights of this project's MLP (not safetensors, or other tensors)."""


class WeightsChangedError(UserError, ValueError):
    """A run's weights file no longer matches the checksum its run recorded."""


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


class NonFiniteError(UserError, RuntimeError):
    """Training diverged: the gradients of a step are NaN or infinite."""


class RendezvousError(UserError, RuntimeError):
    """The processes of a run did not all meet in time; the message says who waited for what."""

    recurs = False  # a late node may be there next time


class ReportError(UserError, ValueError):
    """The run directory lacks what a picture needs; the message says what."""


class ExportError(UserError, RuntimeError):
    """The export cannot be made; the message says why and what to do."""


class ServeError(UserError, RuntimeError):
    """The server cannot start (a busy port, a missing package); the message says what to do."""


class OutputPathError(UserError, ValueError):
    """An ``--output`` that would overwrite a run's own file or the command's input, or is a directory."""


class PeerLostError(UserError, RuntimeError):
    """A collective failed because another rank of the job died; the message names it. Exit status 4."""

    exit_code = 4
    recurs = False

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint: not an error, exit status 128 + the signal."""

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint} saved. "
            "Run the same command again to resume (resume: auto)"
        )


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (torch's carry C++ frames below it), or its type."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
