"""What training itself refuses before its first step, checked by ``mnist-dist doctor`` on the
same launch and config, so that "all checks passed" means that training will start.

- ``batch``: the global batch splits evenly over the processes (``per_process_batch_size``,
  the check ``training/job.py`` runs first) and the training set has an image for every process;
- ``resume``: the run directory's lock is free, and what training would continue from (or a
  fresh start) is allowed: ``training/resume.py``'s own checks, which read and change nothing.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TRAIN_IMAGES, Config, global_batch_size, per_process_batch_size
from ..errors import ConfigError, UserError
from .facts import FAIL, OK, Check


def batch_split(cfg: Config, world: int) -> Check:
    """The batch each of ``world`` processes takes, and the shard of the training set each reads."""
    try:
        per_process = per_process_batch_size(cfg, world)
    except ConfigError as exc:
        return Check("batch", FAIL, str(exc))
    images = TRAIN_IMAGES - cfg.val_size
    if world > images:
        return Check(
            "batch",
            FAIL,
            f"{world} processes for {images} training images: every process needs one; launch at most {images}",
        )
    shard = -(-images // world)
    return Check(
        "batch",
        OK,
        f"global batch {global_batch_size(cfg, world)} = {world} x {per_process} per process; "
        f"{shard} training images and {-(-shard // per_process)} steps per epoch on each",
    )


def resume_plan(cfg: Config, world: int) -> Check:
    """What training would do with ``output_dir`` on ``world`` processes (main process only: it takes
    the run directory's lock for a moment, as training does first)."""
    from ..runlock import RunLock
    from ..training.integrity import read_state
    from ..training.resume import check_compatible, resolve

    run_dir = Path(cfg.output_dir)
    if not run_dir.is_dir():
        return Check("resume", OK, f"fresh start ({run_dir} does not exist yet)")
    try:
        with RunLock(run_dir):
            path = resolve(cfg, run_dir)
            note = check_compatible(read_state(path), cfg, world, path) if path is not None else None
    except UserError as exc:  # in use by another run; a checkpoint or run that training would refuse
        return Check("resume", FAIL, str(exc))
    except (OSError, ValueError) as exc:  # a run directory that cannot be written: its own check says so
        return Check("resume", FAIL, f"cannot lock or read {run_dir} ({getattr(exc, 'strerror', None) or exc})")
    if path is None:
        return Check("resume", OK, f"fresh start in {run_dir} (resume: {cfg.resume})")
    return Check("resume", OK, f"continues from {path}" + (f"; {note}" if note else ""))
