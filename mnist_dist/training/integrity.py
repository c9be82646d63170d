"""Finding a run's checkpoints on disk and verifying them, byte for byte, before any is used.

A checkpoint's ``trainer_state.json`` lists every file of it with its size and SHA-256,
and carries a SHA-256 of its own content: a changed byte anywhere is caught. Format 1
(before checksums) recorded sizes only; such checkpoints still load, checked by size.
Readers look through one open handle on a checkpoint's directory, and take a second
look before calling it damaged, so a checkpoint replaced while it is read (``save`` swaps
directories) is seen whole, old or new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runs import STATE_FILE, checkpoints_dir, sha256_stream

log = logging.getLogger("mnist_dist")

# Format 1 recorded sizes only; format 2 adds a SHA-256 of every file and of the state itself.
FORMAT, READABLE_FORMATS = 2, (1, 2)


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory named ``step-N`` (or ``.replaced-step-N``), else None."""
    name = path.name.removeprefix(".replaced-")
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-") :])
    except ValueError:
        return None


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a trainer state's content (every key but ``sha256`` itself, canonical JSON)."""
    body = {k: v for k, v in state.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Verdict:
    """What a look at a checkpoint found: ``problem`` is None for a usable one."""

    path: Path
    problem: str | None = None
    size_only: bool = False  # written before checksums: its files could only be checked by size

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        if self.problem:
            return f"damaged: {self.problem}"
        return "good (checked by size only: written before checksums)" if self.size_only else "good (SHA-256 verified)"


def _sha256_at(dir_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as fh:
        return sha256_stream(fh)


def _manifest_problem(dir_fd: int, manifest: dict[str, Any], fmt: int) -> str | None:
    for name, entry in manifest.items():
        size, digest = (entry, None) if fmt == 1 else (entry["size"], entry["sha256"])
        try:
            actual_size = os.stat(name, dir_fd=dir_fd).st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if actual_size != size:
            return f"{name} has {actual_size} bytes, {size} were written"
        if digest is not None:
            actual = _sha256_at(dir_fd, name)
            if actual != digest:
                return (
                    f"{name} does not match its checksum (SHA-256 {actual[:12]}..., {digest[:12]}... was "
                    "written): its bytes changed after the save"
                )
    return None


def verify_checkpoint(path: Path) -> Verdict:
    """Check a checkpoint directory: state file readable and intact, every file present, intact.

    Files are read through one open handle on the directory, so a checkpoint replaced
    while it is read is seen whole, old or new, never half of each.
    """
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        return Verdict(path, f"it cannot be opened ({exc.strerror})")
    try:
        try:
            with os.fdopen(os.open(STATE_FILE, os.O_RDONLY, dir_fd=dir_fd), encoding="utf-8") as fh:
                state = json.load(fh)
        except FileNotFoundError:
            return Verdict(path, f"it has no {STATE_FILE} (not a checkpoint, or its save never finished)")
        fmt = state.get("format")
        if fmt not in READABLE_FORMATS:
            return Verdict(
                path,
                f"{STATE_FILE} has format {fmt!r}; this version reads formats {', '.join(map(str, READABLE_FORMATS))}",
            )
        if fmt >= 2 and state.get("sha256") != state_digest(state):
            return Verdict(path, f"{STATE_FILE} does not match its checksum: its bytes changed after the save")
        problem = _manifest_problem(dir_fd, state["files"], fmt)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return Verdict(path, f"{STATE_FILE} cannot be read ({type(exc).__name__}: {exc})")
    finally:
        os.close(dir_fd)
    return Verdict(path, problem, size_only=fmt == 1)


def scan(run_dir: str | os.PathLike) -> list[Verdict]:
    """Every checkpoint directory of a run, oldest first, each inspected.

    A ``.replaced-step-N`` directory (left by a same-step replacement on a filesystem that
    cannot swap two directories atomically) stands in for ``step-N`` only when that is absent.
    """
    return [verify_checkpoint(path) for path in checkpoint_dirs(run_dir)]


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint directories of a run, oldest first, not yet inspected (see ``scan``)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in sorted(root.iterdir(), key=lambda p: p.name.startswith(".")):  # step-N before .replaced-
        step = step_of(path)
        if step is not None and path.is_dir() and not path.name.startswith(".tmp-"):
            found.setdefault(step, path)
    return [found[step] for step in sorted(found)]


def _settled_scan(run_dir: str | os.PathLike, looks: int = 4) -> list[Verdict]:
    """``scan``, looked at again while what it finds wrong changes from one look to the next:
    another process may be replacing a checkpoint (a directory listing taken during a rename
    can even miss both names). Real damage looks the same twice."""
    verdicts = scan(run_dir)
    for _ in range(looks - 1):
        if verdicts and all(v.ok for v in verdicts):
            break
        again = scan(run_dir)
        if again == verdicts:
            break
        verdicts = again
    return verdicts


def sort_checkpoints(run_dir: str | os.PathLike) -> tuple[list[Path], list[Verdict]]:
    """``(usable checkpoints, damaged ones)`` of a run directory, each oldest first."""
    verdicts = _settled_scan(run_dir)
    return [v.path for v in verdicts if v.ok], [v for v in verdicts if not v.ok]


def complete_checkpoints(run_dir: str | os.PathLike, warn: bool = True) -> list[Path]:
    """The usable checkpoints of a run directory, oldest first; damaged ones are skipped with a warning."""
    good, damaged = sort_checkpoints(run_dir)
    for verdict in damaged if warn else ():
        log.warning("skipping checkpoint %s: %s", verdict.path, verdict.problem)
    return good


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def verify_run(run_dir: Path) -> tuple[list[str], bool]:
    """Lines describing every checkpoint and the final weights of a run; False if the newest
    checkpoint (or the final weights) cannot be used."""
    from ..runs import WEIGHTS_FILE, weights_problem

    verdicts = scan(run_dir)
    lines = [f"{v.path.relative_to(run_dir)}: {v.describe()}" for v in verdicts]
    ok = not verdicts or verdicts[-1].ok
    for aside in sorted(checkpoints_dir(run_dir).glob("step-*.damaged-*")):  # replaced by a good save since
        lines.append(f"{aside.relative_to(run_dir)}: set aside: {verify_checkpoint(aside).describe()}")
    if not verdicts:
        lines.append(f"{checkpoints_dir(run_dir).relative_to(run_dir)}: no checkpoints")
    weights = run_dir / WEIGHTS_FILE
    if weights.is_file():
        problem, recorded = weights_problem(weights)
        if problem:
            ok = False
            lines.append(f"{WEIGHTS_FILE}: damaged: {problem}")
        else:
            lines.append(
                f"{WEIGHTS_FILE}: "
                + ("good (SHA-256 verified)" if recorded else "no checksum recorded (written before checksums)")
            )
    return lines, ok
