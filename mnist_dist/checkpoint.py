"""Checkpoints: written atomically, found, checked against the run, and loaded for an exact resume.

``RUN_DIR/checkpoints/step-00001234/`` holds what ``Accelerator.save_state`` writes (the
model as safetensors, the optimizer state, every rank's RNG states), one
``rank-N.json`` per rank (its running loss sums), and ``trainer_state.json``: where
training is (epoch, step, batches done in the epoch), the config and world size that
wrote it, and a manifest of every file with its size.

A checkpoint is written under a hidden temporary name and renamed into place once every
rank has written its part and ``trainer_state.json`` is on disk: the rename is the
commit. A crash mid-save leaves only a ``.tmp-*`` directory, which is never loaded and
is removed by the next save; older checkpoints are deleted only after a newer one is
complete. Nothing is unpickled beyond what ``torch.load(weights_only=True)`` allows
(Accelerate loads optimizer and RNG states that way); the rest is JSON.

The run directory must be on a filesystem every node sees (as a SLURM job's usually is).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .config import Config

log = logging.getLogger("mnist_dist")

CHECKPOINTS_DIR, STATE_FILE, FORMAT = "checkpoints", "trainer_state.json", 1

# Config keys a resumed run may change: where files go, what is logged, how often to
# checkpoint, how evaluation is batched. Every other key changes the training mathematics.
FREE_TO_CHANGE = frozenset({
    "data_dir", "output_dir", "resume", "requeue", "checkpoint_every", "checkpoint_every_epochs",
    "keep_checkpoints", "log_every", "collective_timeout", "rendezvous_timeout", "eval_batch_size", "check_finite", "cpu",
    "tracker", "wandb_project", "wandb_entity", "wandb_run_name", "wandb_tags", "wandb_group", "wandb_dir",
})
# With a constant learning rate the run's length does not change any step already taken.
LENGTH_KEYS = frozenset({"epochs", "max_steps"})


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-"):])
    except ValueError:
        return None


def problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is one."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"it has no {STATE_FILE} (not a checkpoint, or its save never finished)"
    try:
        state = json.loads(state_file.read_text())
        manifest = state["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {STATE_FILE} cannot be read ({exc})"
    if state.get("format") != FORMAT:
        return f"it has format {state.get('format')!r}; this version reads format {FORMAT}"
    for name, size in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first. Incomplete ones are skipped, with a warning."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = _step_of(path)
        if step is None or not path.is_dir():
            continue
        why = problem(path)
        if why:
            log.warning("skipping checkpoint %s: %s", path, why)
            continue
        found.append((step, path))
    return [path for _, path in sorted(found)]


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def resolve(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint ``cfg.resume`` asks for: a complete checkpoint, or None for a fresh start."""
    if cfg.resume == "none":
        existing = complete_checkpoints(run_dir)
        if existing:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints of a run (newest: {existing[-1].name}) and resume is 'none'; "
                f"continue that run with --resume auto, or start afresh in another --output-dir "
                f"(or delete {checkpoints_dir(run_dir)})"
            )
        return None
    if cfg.resume == "auto":
        existing = complete_checkpoints(run_dir)
        return existing[-1] if existing else None
    path = Path(cfg.resume)
    if (path / CHECKPOINTS_DIR).is_dir():  # a run directory: its newest checkpoint
        existing = complete_checkpoints(path)
        if not existing:
            raise CheckpointError(f"--resume {path}: that run directory has no complete checkpoint")
        return existing[-1]
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint directory; pass a checkpoint "
                              f"(RUN_DIR/{CHECKPOINTS_DIR}/step-N), a run directory, 'auto' or 'none'")
    why = problem(path)
    if why:
        raise CheckpointError(f"--resume {path}: not a complete checkpoint: {why}")
    return path


def check_compatible(state: dict[str, Any], cfg: Config, world_size: int, path: Path) -> None:
    """Refuse a checkpoint whose run would continue with different mathematics."""
    if state["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {state['world_size']} process(es), this run has {world_size}; "
            f"resume with {state['world_size']} (e.g. accelerate launch --num_processes {state['world_size']}), "
            "or start afresh in another --output-dir"
        )
    saved, now = state["config"], cfg.to_dict()
    free = FREE_TO_CHANGE
    if now["lr_schedule"] == "constant" and now["warmup_fraction"] == 0:
        free = free | LENGTH_KEYS
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in free and saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was written with a different config ({'; '.join(changed)}), which would change "
            "the training mathematics; resume with the checkpoint's values, or start afresh in another --output-dir"
        )
    at = state["progress"]
    if at["epoch"] > cfg.epochs or (cfg.max_steps is not None and at["step"] > cfg.max_steps):
        raise CheckpointError(
            f"checkpoint {path} is at epoch {at['epoch']}, step {at['step']}: beyond this run's "
            f"epochs ({cfg.epochs}) / max_steps ({cfg.max_steps})"
        )


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
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
        for leftover in root.glob(".tmp-*"):  # an earlier save that never finished
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    _write_json(tmp / f"rank-{accelerator.process_index}.json", rank_state)
    accelerator.wait_for_everyone()
    if main:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for f in files:  # Accelerate does not fsync what it writes
            _fsync(f)
        manifest = {f.name: f.stat().st_size for f in files}
        _write_json(tmp / STATE_FILE, {**state, "format": FORMAT, "files": manifest})
        _fsync(tmp)
        if final.exists():  # the same step saved before (a stop on an epoch's last step, then its end)
            _remove(final)
        os.rename(tmp, final)
        _fsync(root)
        for old in complete_checkpoints(run_dir)[:-keep]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load model, optimizer and RNG states from ``path`` into the prepared objects; return
    ``(trainer state, this rank's state)``."""
    why = problem(path)
    if why:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {why}")
    accelerator.load_state(str(path))
    rank_file = path / f"rank-{accelerator.process_index}.json"
    return read_state(path), json.loads(rank_file.read_text())
