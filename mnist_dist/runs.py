"""The run directory: the name of every file in it, atomic writes, and the run's weights.

``--output-dir`` holds, by name (all defined here):

- ``config.yaml``: the merged config (defaults < ``--config`` file < options);
- ``metrics.json``: the final metrics, and ``weights_sha256``, the SHA-256 of the weights
  written: loading a run's weights checks it, so a file changed since is refused;
- ``model.safetensors``: the MLP's state dict;
- ``history.jsonl``: one JSON record per logged step and epoch; ``misclassified.safetensors``;
- ``curves.png``, ``confusion_matrix.png``, ``misclassified.png`` (and ``timing.png`` for a run of
  several processes): ``mnist-dist report``;
- ``doctor.json``: the last preflight's report; ``wandb/``: wandb's files;
- ``checkpoints/step-NNNNNNNN/``: checkpoints, each with its ``trainer_state.json``.

Every file is written atomically: a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingFileError, OutputPathError, RunDirError, WeightsChangedError, WeightsError
from .runlock import LOCK_DIR

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mnist_dist")

CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE = "config.yaml", "metrics.json", "model.safetensors"
HISTORY_FILE, MISCLASSIFIED_FILE = "history.jsonl", "misclassified.safetensors"
CURVES_FILE, CONFUSION_FILE, GRID_FILE = "curves.png", "confusion_matrix.png", "misclassified.png"
TIMING_FILE = "timing.png"  # runs of several processes: each rank's step time
DOCTOR_FILE = "doctor.json"
CHECKPOINTS_DIR, STATE_FILE = "checkpoints", "trainer_state.json"  # STATE_FILE: inside each checkpoint


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run's checkpoints are."""
    return Path(run_dir) / CHECKPOINTS_DIR


def prepare_run_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any training time is spent."""
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Unique across nodes sharing the directory (same pid on two hosts is common).
        probe = run_dir / f".write-test-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(
            f"output directory {run_dir} is not writable ({exc.strerror or exc}); "
            "pass a writable directory with --output-dir"
        ) from None
    return run_dir


def file_mode() -> int:
    """The permissions a new file gets here (0o666 less the umask), read without changing the umask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"could not write {path} ({exc.strerror or exc}); the previous copy is kept") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def sha256_stream(fh, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of what is left to read in a binary file object, read in chunks."""
    digest = hashlib.sha256()
    while block := fh.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as fh:
        return sha256_stream(fh)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> str:
    """Save a state dict as safetensors (no pickle: loading it can run no code); return the bytes' SHA-256."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    data = save(tensors)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def weights_file(path: str | os.PathLike) -> Path:
    """The weights a path names: the file itself, or a run directory's ``model.safetensors``."""
    p = Path(path)
    if p.is_dir():
        if not (p / WEIGHTS_FILE).is_file():
            raise MissingFileError(f"run directory {p} has no {WEIGHTS_FILE} (its training has not finished)")
        return p / WEIGHTS_FILE
    if not p.is_file():
        raise MissingFileError(f"weights file {p} does not exist (a run writes {WEIGHTS_FILE} in its --output-dir)")
    return p


def run_metrics(weights: str | os.PathLike) -> tuple[Path | None, dict[str, Any]]:
    """The run's ``metrics.json`` (in a run directory, or beside a weights file) and its content;
    ``(None, {})`` if there is none, or it is not readable JSON (said in a warning)."""
    p = Path(weights)
    path = (p if p.is_dir() else p.parent) / METRICS_FILE
    if not path.is_file():
        return None, {}
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: not readable JSON (%s)", path, exc)
        return None, {}
    return (path, metrics) if isinstance(metrics, dict) else (None, {})


def recorded_sha256(weights: Path) -> str | None:
    """The SHA-256 that the run beside ``weights`` recorded for it in ``metrics.json``, if any."""
    if weights.name != WEIGHTS_FILE:
        return None
    return run_metrics(weights)[1].get("weights_sha256")


def weights_problem(weights: Path, data: bytes | None = None) -> tuple[str | None, bool]:
    """``(what is wrong with a run's weights file or None, whether a checksum was recorded)``.

    A mismatch only says that the two files disagree: the weights may have changed, or the
    checksum in ``metrics.json`` (an edit, a copy from another run).
    """
    expected = recorded_sha256(weights)
    if expected is None:
        return None, False
    actual = hashlib.sha256(weights.read_bytes() if data is None else data).hexdigest()
    if actual == expected:
        return None, True
    return (
        f"{weights} does not match the SHA-256 its run recorded in {weights.parent / METRICS_FILE} "
        f"(the file's is {str(actual)[:12]}..., {str(expected)[:12]}... is recorded): the two disagree, so either "
        f"the weights or the weights_sha256 of {METRICS_FILE} changed after training"
    ), True


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict from a weights file or a run directory.

    A run's own ``model.safetensors`` (one with the run's ``metrics.json`` beside it) is
    verified against the checksum recorded there, and refused if it changed; a bare
    weights file elsewhere is loaded as it is.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    p = weights_file(path)
    data = p.read_bytes()
    problem, recorded = weights_problem(p, data)
    if problem:
        raise WeightsChangedError(f"{problem}; retrain, or restore both files from a copy you trust")
    metrics = run_metrics(p)[0] if p.name == WEIGHTS_FILE and not recorded else None
    if metrics is not None:  # a run's metrics.json without the checksum: say that nothing was checked
        log.warning(
            "%s records no weights_sha256: %s is loaded unchecked (written before checksums, or the key was removed)",
            metrics,
            p,
        )
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{p} is not a safetensors weights file ({exc})") from None


# --- what a command may write: never a run's own file, nor the file it reads -------------------

# The files a run directory owns, and what each is to it (said when an --output names one).
RUN_FILES = {
    WEIGHTS_FILE: "the run's own weights file",
    METRICS_FILE: "the run's metrics and weights checksum",
    CONFIG_FILE: "the run's config",
    HISTORY_FILE: "the run's history",
    MISCLASSIFIED_FILE: "the run's misclassified digits",
    DOCTOR_FILE: "the run's preflight report",
    CURVES_FILE: "a picture of the run's report",
    CONFUSION_FILE: "a picture of the run's report",
    GRID_FILE: "a picture of the run's report",
    TIMING_FILE: "a picture of the run's report",
    LOCK_DIR: "the run's lock",
}
RUN_MARKERS = (METRICS_FILE, CONFIG_FILE, HISTORY_FILE, CHECKPOINTS_DIR)  # any one makes a run directory
RUN_SUBDIRS = (CHECKPOINTS_DIR, "wandb")  # everything under these belongs to the run


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory: it holds a run's metrics, config, history or checkpoints."""
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def _run_owning(path: Path) -> tuple[Path, str] | None:
    """``(run directory, what the file is to it)`` when a run owns ``path``; None when none does."""
    if path.name in RUN_FILES and is_run_dir(path.parent):
        return path.parent, RUN_FILES[path.name]
    for above in path.parents:
        if above.name in RUN_SUBDIRS and is_run_dir(above.parent):
            return above.parent, f"inside the run's {above.name}/ directory"
    return None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) a hard link."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): then they are not one file
        return False


def check_output(
    output: str | os.PathLike,
    inputs: tuple[str | os.PathLike, ...] = (),
    what: str = "--output",
    example: str = "output.json",
) -> Path:
    """``output`` as a Path, once it is sure that writing it destroys nothing.

    Refused, with an :class:`~mnist_dist.errors.OutputPathError` that names a path to use
    instead (``example`` in the same directory): a directory; a file a run directory owns
    (``RUN_FILES``, or anything under its ``checkpoints/`` or ``wandb/``); any of ``inputs``.
    """
    path = Path(output)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; name a file in it, e.g. {what} {path / example}")
    owner = _run_owning(Path(os.path.normpath(path))) or _run_owning(path.resolve())
    if owner:
        run, role = owner
        raise OutputPathError(
            f"{what} {path} is {role} ({run} is a run directory); write it elsewhere, e.g. {what} {run / example}"
        )
    for source in inputs:
        if _same_file(path, Path(source)):
            raise OutputPathError(
                f"{what} {path} is the file this command reads ({source}); "
                f"write it elsewhere, e.g. {what} {path.parent / example}"
            )
    return path
