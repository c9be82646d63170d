"""Verifying a checkpoint, byte for byte, before it is used.

A checkpoint's ``trainer_state.json`` lists every file of it with its size and SHA-256,
and carries a SHA-256 of its own content: a changed byte anywhere is caught. Format 1
(before checksums) recorded sizes only; such checkpoints still load, checked by size.
Readers look through one open handle on a checkpoint's directory, so a checkpoint replaced
while it is read (``save`` swaps directories) is seen whole, old or new; finding a run's
checkpoints (``resume.py``) takes a second look before calling one damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runs import STATE_FILE, sha256_stream

# Format 1 recorded sizes only; format 2 adds a SHA-256 of every file and of the state itself.
FORMAT, READABLE_FORMATS = 2, (1, 2)


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


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())
