"""A run's checkpoints on disk: finding them, each verified (``integrity.py``); which one a run
continues from, and whether it may (``checkpoint.CheckpointManager`` asks); the report of
``mnist-dist checkpoints verify``.

``auto`` takes the newest usable checkpoint of the run directory; ``PATH`` a given one,
unless the run directory has a newer one of its own (a job never goes backwards); ``none``
a fresh start. A checkpoint may continue with another number of processes in
``batch_mode: global`` (the global batches and the learning rate do not depend on it),
never with a config that changes the training mathematics.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..config import Config, free_on_resume, per_process_batch_size
from ..errors import CheckpointError, ConfigError
from ..runs import CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, checkpoints_dir, weights_problem
from .integrity import Verdict, read_state, verify_checkpoint

log = logging.getLogger("mnist_dist")


# -- finding a run's checkpoints -------------------------------------------------------------


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory named ``step-N`` (or ``.replaced-step-N``), else None."""
    name = path.name.removeprefix(".replaced-")
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-") :])
    except ValueError:
        return None


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


# -- choosing the one to continue from ---------------------------------------------------------


def _newest_of_run(run_dir: Path) -> Path | None:
    """The newest usable checkpoint of ``run_dir`` (None if it has none); refused if every one is damaged."""
    good, damaged = sort_checkpoints(run_dir)
    if damaged and not good:
        listed = "; ".join(f"{v.path.name}: {v.problem}" for v in damaged)
        raise CheckpointError(
            f"every checkpoint of {run_dir} is damaged ({listed}), so there is nothing to continue from; see "
            f"mnist-dist checkpoints verify {run_dir}, and start afresh in another --output-dir"
        )
    for verdict in damaged:
        log.warning("skipping checkpoint %s: %s", verdict.path, verdict.problem)
    return good[-1] if good else None


def changed_keys(saved: dict[str, Any], cfg: Config) -> list[str]:
    """The keys of ``cfg`` that differ from a run's ``saved`` config and change its training mathematics."""
    now, free = cfg.to_dict(), free_on_resume(cfg)
    return [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in free and saved.get(k) != now[k]]


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run in ``run_dir`` started with (its ``config.yaml``), if one did."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def refuse_overwriting(cfg: Config, run_dir: Path) -> None:
    """Before a fresh start in ``run_dir``: refuse to overwrite a finished run, or to take over the
    identity (history, wandb run) of a run with another config that ended before its first checkpoint."""
    finished = [name for name in (WEIGHTS_FILE, METRICS_FILE) if (run_dir / name).exists()]
    if finished:
        raise CheckpointError(
            f"{run_dir} holds a finished run ({', '.join(finished)}) and no checkpoint to continue it from; "
            "a fresh start would overwrite it: train into another --output-dir"
        )
    saved = _saved_config(run_dir) if cfg.resume == "auto" else None
    changed = changed_keys(saved, cfg) if saved is not None else []
    if changed:
        raise CheckpointError(
            f"{run_dir} holds a run with a different config ({'; '.join(changed)}) that stopped before its "
            "first checkpoint; repeat it with its values, start this one in another --output-dir, "
            "or replace it with --resume none"
        )


def _requested(resume: str) -> Path:
    """The checkpoint ``--resume PATH`` names: a checkpoint, or the newest usable one of a run directory."""
    path = Path(resume)
    if (path / CHECKPOINTS_DIR).is_dir():
        newest = _newest_of_run(path)
        if newest is None:
            raise CheckpointError(f"--resume {path}: that run directory has no usable checkpoint")
        return newest
    if not path.is_dir():
        raise CheckpointError(
            f"--resume {path}: no such checkpoint directory; pass a checkpoint "
            f"(RUN_DIR/{CHECKPOINTS_DIR}/step-N), a run directory, 'auto' or 'none'"
        )
    verdict = verify_checkpoint(path)
    if not verdict.ok:
        raise CheckpointError(
            f"--resume {path}: this checkpoint cannot be used: {verdict.problem}; "
            "resume from an earlier checkpoint or run directory instead"
        )
    return path


def resolve(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start.

    ``auto``: the newest usable checkpoint of ``run_dir``. ``PATH``: that checkpoint, unless
    ``run_dir`` holds a newer one (a requeued job, or the same command run again): a job
    never goes backwards. ``none``: a fresh start, refused if ``run_dir`` has checkpoints.
    """
    if cfg.resume == "none":
        existing = complete_checkpoints(run_dir)
        if existing:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints of a run (newest: {existing[-1].name}) and resume is 'none'; "
                f"continue that run with --resume auto, or start afresh in another --output-dir "
                f"(or delete {checkpoints_dir(run_dir)})"
            )
        refuse_overwriting(cfg, run_dir)
        return None
    own = _newest_of_run(run_dir)
    chosen = own
    if cfg.resume != "auto":
        chosen = _requested(cfg.resume)
        if own is not None and own.resolve() != chosen.resolve() and step_of(own) >= step_of(chosen):
            log.info(
                "%s holds a newer checkpoint (step %d) than --resume %s (step %d): continuing from it",
                run_dir,
                step_of(own),
                cfg.resume,
                step_of(chosen),
            )
            chosen = own
    if chosen is None:
        refuse_overwriting(cfg, run_dir)
    elif read_state(chosen).get("format") == 1:  # verified already; format 1 had no checksums
        log.info("note: checkpoint %s was written before checksums; it could only be checked by size", chosen)
    return chosen


def resolve_on_main(accelerator, cfg: Config, run_dir: Path) -> Path | None:
    """``resolve`` on the main process only (one set of warnings, one verdict), shared with every rank."""
    answer: list[str | None] = [None, None]
    if accelerator.is_main_process:
        try:
            found = resolve(cfg, run_dir)
            answer = [None if found is None else str(found), None]
        except CheckpointError as exc:
            answer = [None, str(exc)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer)
    if answer[1] is not None:
        raise CheckpointError(answer[1])
    return None if answer[0] is None else Path(answer[0])


def check_compatible(state: dict[str, Any], cfg: Config, world_size: int, path: Path) -> str | None:
    """Refuse a checkpoint whose run would continue with different mathematics.

    Returns a line to show when the number of processes changes (allowed in ``batch_mode:
    global``, where the global batches and the learning rate do not depend on it).
    """
    note = None
    written = state["world_size"]
    if written != world_size:
        if cfg.batch_mode != "global":
            raise CheckpointError(
                f"checkpoint {path} was written by {written} process(es) in batch_mode 'per_device'; on {world_size} "
                f"the global batch would change ({cfg.batch_size * written} -> {cfg.batch_size * world_size}); "
                f"resume with {written} (e.g. accelerate launch --num_processes {written}), or start afresh"
            )
        try:
            per_process_batch_size(cfg, world_size)
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {path} cannot continue on {world_size} processes: {exc}") from None
        note = f"checkpoint {path.name} was written by {written} process(es), continuing on {world_size}"
    changed = changed_keys(state["config"], cfg)
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
    return note


def verify_run(run_dir: Path) -> tuple[list[str], bool]:
    """Lines describing every checkpoint and the final weights of a run; False if the newest
    checkpoint (or the final weights) cannot be used."""
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
