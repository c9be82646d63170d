"""Writing checkpoints atomically, keeping the newest, and deciding when to save.

``RUN_DIR/checkpoints/step-00001234/`` holds what ``Accelerator.save_state`` writes (the
model as safetensors, the optimizer state, every rank's RNG states), one
``rank-N.json`` per rank (its running loss sums), and ``trainer_state.json``: where
training is (epoch, step, batches done in the epoch), the config and world size that
wrote it, the wandb run id, and the size and SHA-256 of every file (see ``integrity.py``).

A checkpoint is written under a hidden temporary name and renamed into place once every
rank has written its part and ``trainer_state.json`` is on disk: the rename is the
commit. A crash mid-save leaves only a ``.tmp-*`` directory, which is never loaded and
is removed by the next save. Older checkpoints are deleted only after a newer one is
complete, never the one just written; a damaged checkpoint is never deleted (it stays for
inspection) and never counts as one of the newest ``keep_checkpoints`` (retention re-reads
a checkpoint that a write touched since this process last verified it; loading always
verifies every byte). Nothing is unpickled beyond what ``torch.load(weights_only=True)``
allows (Accelerate loads optimizer and RNG states that way); the rest is JSON.

The run directory must be on a filesystem every node sees (as a SLURM job's usually is).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import load

from ..errors import CheckpointError
from ..runs import STATE_FILE, checkpoints_dir, file_mode, sha256_file
from .integrity import FORMAT, read_state, state_digest, verify_checkpoint
from .resume import check_compatible, checkpoint_dirs, resolve_on_main

log = logging.getLogger("mnist_dist")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed out of the way first, so it never looks half there."""
    trash = path.with_name(f".trash-{path.name.lstrip('.')}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2``); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # e.g. NFS
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(new: Path, final: Path) -> None:
    """Put ``new`` in the place of the existing checkpoint ``final`` so that one of them is always there.

    Where the filesystem cannot swap them atomically, the old one steps aside as
    ``.replaced-step-N`` (found by ``scan`` while ``step-N`` is absent) and is removed by
    the next save, so that a reader who found it there can still read it.
    """
    if _exchange(new, final):
        _remove(new)  # now the old checkpoint
        return
    aside = final.with_name(f".replaced-{final.name}")
    if aside.exists():
        _remove(aside)
    os.rename(final, aside)
    os.rename(new, final)


def _commit(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """Checksum every file, write the state file last, and move the checkpoint into place."""
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    mode = file_mode()
    for f in files:  # Accelerate neither fsyncs what it writes nor gives its safetensors file the usual mode
        os.chmod(f, mode)
        _fsync(f)
    manifest = {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in files}
    record = {**state, "format": FORMAT, "files": manifest}
    record["sha256"] = state_digest(record)
    _write_json(tmp / STATE_FILE, record)
    _fsync(tmp)
    if final.exists() and not verify_checkpoint(final).ok:  # kept for inspection, out of the way
        os.rename(final, final.with_name(f"{final.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"))
    if final.exists():  # the same step saved before (a stop on an epoch's last step, then its end)
        _replace(tmp, final)
    else:
        os.rename(tmp, final)
    _fsync(final.parent)
    _seen_good[final] = _signature(final)  # its checksums were just taken from these very files


# Checkpoints this process found good, with the metadata of their files then: retention
# re-reads a checkpoint only if a file of it was written to since (loading always re-reads).
_seen_good: dict[Path, tuple] = {}


def _signature(path: Path) -> tuple:
    return tuple(sorted((f.name, st.st_ino, st.st_size, st.st_mtime_ns) for f in path.iterdir() for st in [f.stat()]))


def _still_good(path: Path) -> bool:
    """Whether a checkpoint is usable, reusing this process's last verdict while its files are untouched."""
    try:
        signature = _signature(path)
    except OSError:
        return False
    if _seen_good.get(path) == signature:
        return True
    good = verify_checkpoint(path).ok
    if good:
        _seen_good[path] = signature
    return good


def _retain(run_dir: Path, just_written: Path, keep: int) -> None:
    """Delete the oldest usable checkpoints beyond ``keep``; never the one just written, never a damaged one."""
    others = [p for p in checkpoint_dirs(run_dir) if p != just_written and _still_good(p)]
    for old in others[: max(0, len(others) - (keep - 1))]:
        _remove(old)
        aside = old.with_name(f".replaced-{old.name.removeprefix('.replaced-')}")
        if aside.exists():  # never let an older copy of that step stand in for it
            _remove(aside)


def _clear_leftovers(root: Path, saving: Path) -> None:
    """Remove what earlier saves left behind: unfinished ``.tmp-*``, and ``.replaced-*`` copies
    whose checkpoint is back in place (but the one of the step being saved, which a reader
    may still be reading: its replacement removes it)."""
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for aside in root.glob(".replaced-step-*"):
        original = root / aside.name.removeprefix(".replaced-")
        if original != saving and original.is_dir():
            shutil.rmtree(aside, ignore_errors=True)


def save(accelerator, run_dir: Path, state: dict[str, Any], rank_state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint of step ``state['progress']['step']`` on every rank (a collective); returns its path.

    ``state`` is the run's position (the same on every rank); ``rank_state`` this rank's own part.
    """
    root = checkpoints_dir(run_dir)
    final = root / f"step-{state['progress']['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(root, final)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    _write_json(tmp / f"rank-{accelerator.process_index}.json", rank_state)
    accelerator.wait_for_everyone()
    if main:
        _commit(tmp, final, state)
        _retain(run_dir, final, keep)
    accelerator.wait_for_everyone()
    return final


def mean_rank_state(path: Path, written: int) -> dict[str, Any]:
    """Running loss sums for a rank of a run with another number of processes.

    The logged loss is the mean over ranks of each rank's sum; giving every new rank the
    mean of the old ranks' sums keeps that mean.
    """
    parts = [json.loads((path / f"rank-{r}.json").read_text()) for r in range(written)]
    out = dict(parts[0])
    for key in ("interval_loss", "epoch_loss"):
        out[key] = sum(p[key] for p in parts) / written
    return out


def _load_rng_of(path: Path, rank: int) -> None:
    """Take rank ``rank``'s saved CPU RNG states (for a rank the checkpoint had no state for).

    Training draws nothing from these generators (shuffling and augmentation are seeded by
    seed and epoch), so any rank's state serves; CUDA states are left as they are, since the
    device count may differ.
    """
    states = load(path / f"random_states_{rank}.pkl")
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, verified and found compatible, with its trainer state
    (``trainer_state.json``, read once)."""

    path: Path
    state: dict[str, Any]


@dataclass
class CheckpointManager:
    """The one face of a run's checkpoints: which one to continue from (``resume_point``), when to
    save (``due_after_step``, ``due_after_epoch``), saving (``save``) and loading (``load``).

    Saves come at the end of every ``every_epochs`` epochs, every ``every_steps`` optimizer
    steps (0: never), at the end of training, and on a stop signal. Choosing and verifying
    are in ``resume.py`` and ``integrity.py``, writing in this module, all behind this class.
    """

    accelerator: Any
    run_dir: Path
    every_steps: int
    every_epochs: int
    keep: int
    cfg: Any = None  # the run's config: what a checkpoint must be compatible with

    @classmethod
    def from_config(cls, cfg, accelerator, run_dir: Path) -> CheckpointManager:
        every = (cfg.checkpoint_every, cfg.checkpoint_every_epochs, cfg.keep_checkpoints)
        return cls(accelerator, Path(run_dir), *every, cfg=cfg)

    def resume_point(self) -> ResumePoint | None:
        """The checkpoint to continue from (None: a fresh start), chosen on the main process before
        anything in the run directory is written, verified, and checked compatible with this run."""
        path = resolve_on_main(self.accelerator, self.cfg, self.run_dir)
        if path is None:
            return None
        state = read_state(path)
        note = check_compatible(state, self.cfg, self.accelerator.num_processes, path)
        if note:
            log.info(note)
        return ResumePoint(path, state)

    def due_after_step(self, step: int, epoch_done: bool, finished: bool) -> bool:
        """A save inside an epoch: every ``every_steps``, unless the epoch's (or the run's) end
        comes with this very step, which saves then."""
        return bool(self.every_steps) and step % self.every_steps == 0 and not (epoch_done or finished)

    def due_after_epoch(self, step: int, epoch: int, finished: bool) -> bool:
        """A save at an epoch's end (after its evaluation)."""
        return (
            finished
            or (bool(self.every_steps) and step % self.every_steps == 0)
            or (bool(self.every_epochs) and epoch % self.every_epochs == 0)
        )

    def save(self, state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Save now, on every rank (a collective); returns the checkpoint's path."""
        return save(self.accelerator, self.run_dir, state, rank_state, self.keep)

    def load(self, point: ResumePoint) -> dict[str, Any]:
        """Load model, optimizer and RNG states from ``point`` into the prepared objects, every byte
        verified; return this rank's own state. Works on another number of processes than the
        checkpoint's (ranks are mapped onto the saved ones)."""
        verdict = verify_checkpoint(point.path)
        if not verdict.ok:
            raise CheckpointError(f"checkpoint {point.path} cannot be loaded: {verdict.problem}")
        self.accelerator.load_state(str(point.path))
        written, rank = point.state["world_size"], self.accelerator.process_index
        if written == self.accelerator.num_processes:
            return json.loads((point.path / f"rank-{rank}.json").read_text())
        if rank >= written:
            _load_rng_of(point.path, rank % written)
        return mean_rank_state(point.path, written)
