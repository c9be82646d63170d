"""Checkpoints: written atomically, verified by their content, found, checked against the run, loaded.

``RUN_DIR/checkpoints/step-00001234/`` holds what ``Accelerator.save_state`` writes (the
model as safetensors, the optimizer state, every rank's RNG states), one
``rank-N.json`` per rank (its running loss sums), and ``trainer_state.json``: where
training is (epoch, step, batches done in the epoch), the config and world size that
wrote it, and a manifest of every file with its size and SHA-256. The state file carries
a SHA-256 of its own content too, so a changed byte anywhere in a checkpoint is caught.

A checkpoint is written under a hidden temporary name and renamed into place once every
rank has written its part and ``trainer_state.json`` is on disk: the rename is the
commit. A crash mid-save leaves only a ``.tmp-*`` directory, which is never loaded and
is removed by the next save. Older checkpoints are deleted only after a newer one is
complete; a damaged checkpoint is never deleted (it stays for inspection) and never
counts as one of the newest ``keep_checkpoints`` (retention re-reads a checkpoint that a
write touched since this process last verified it; loading always verifies every byte).
Nothing is unpickled beyond what
``torch.load(weights_only=True)`` allows (Accelerate loads optimizer and RNG states that
way); the rest is JSON.

The run directory must be on a filesystem every node sees (as a SLURM job's usually is).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, per_process_batch_size
from .runs import sha256_file, sha256_stream

log = logging.getLogger("mnist_dist")

CHECKPOINTS_DIR, STATE_FILE = "checkpoints", "trainer_state.json"
# Format 1 recorded sizes only; format 2 adds a SHA-256 of every file and of the state itself.
FORMAT, READABLE_FORMATS = 2, (1, 2)

# Config keys a resumed run may change: where files go, what is logged, how often to
# checkpoint, how evaluation is batched. Every other key changes the training mathematics.
FREE_TO_CHANGE = frozenset(
    {
        "data_dir",
        "output_dir",
        "resume",
        "requeue",
        "checkpoint_every",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "log_every",
        "collective_timeout",
        "rendezvous_timeout",
        "eval_batch_size",
        "check_finite",
        "cpu",
        "tracker",
        "wandb_project",
        "wandb_entity",
        "wandb_run_name",
        "wandb_tags",
        "wandb_group",
        "wandb_dir",
    }
)
# With a constant learning rate the run's length does not change any step already taken.
LENGTH_KEYS = frozenset({"epochs", "max_steps"})


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory named ``step-N`` (or ``.replaced-step-N``), else None."""
    name = path.name.removeprefix(".replaced-")
    if not name.startswith("step-"):
        return None
    try:
        return int(name[len("step-") :])
    except ValueError:
        return None


# -- verification -----------------------------------------------------------------------


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


def inspect(path: Path) -> Verdict:
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
    return [inspect(path) for path in checkpoint_dirs(run_dir)]


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


def complete_checkpoints(run_dir: str | os.PathLike, warn: bool = True) -> list[Path]:
    """The usable checkpoints of a run directory, oldest first; damaged ones are skipped with a warning."""
    verdicts = scan(run_dir)
    if not verdicts or not all(v.ok for v in verdicts):
        # A second look: another process may have been replacing a checkpoint (a directory
        # listing taken during a rename can even miss both names).
        verdicts = scan(run_dir)
    good = []
    for verdict in verdicts:
        if verdict.ok:
            good.append(verdict.path)
        elif warn:
            log.warning("skipping checkpoint %s: %s", verdict.path, verdict.problem)
    return good


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


# -- which checkpoint a run continues from ------------------------------------------------


def _newest_of_run(run_dir: Path, what: str) -> Path | None:
    existing = complete_checkpoints(run_dir)
    if not existing and scan(run_dir):
        log.warning("%s holds checkpoints but none is usable (see above): %s", run_dir, what)
    return existing[-1] if existing else None


def _requested(resume: str) -> Path:
    """The checkpoint ``--resume PATH`` names: a checkpoint, or the newest usable one of a run directory."""
    path = Path(resume)
    if (path / CHECKPOINTS_DIR).is_dir():
        newest = _newest_of_run(path, "nothing to resume")
        if newest is None:
            raise CheckpointError(f"--resume {path}: that run directory has no usable checkpoint")
        return newest
    if not path.is_dir():
        raise CheckpointError(
            f"--resume {path}: no such checkpoint directory; pass a checkpoint "
            f"(RUN_DIR/{CHECKPOINTS_DIR}/step-N), a run directory, 'auto' or 'none'"
        )
    verdict = inspect(path)
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
        return None
    own = _newest_of_run(run_dir, "starting afresh" if cfg.resume == "auto" else "using --resume")
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
    if chosen is not None and inspect(chosen).size_only:
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
    return note


# -- writing ------------------------------------------------------------------------------


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
    for f in files:  # Accelerate does not fsync what it writes
        _fsync(f)
    manifest = {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in files}
    record = {**state, "format": FORMAT, "files": manifest}
    record["sha256"] = state_digest(record)
    _write_json(tmp / STATE_FILE, record)
    _fsync(tmp)
    if final.exists() and not inspect(final).ok:  # kept for inspection, out of the way
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
    good = inspect(path).ok
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


# -- loading ------------------------------------------------------------------------------


def _mean_rank_state(path: Path, written: int) -> dict[str, Any]:
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
    import random

    import numpy as np
    import torch
    from accelerate.utils import load

    states = load(path / f"random_states_{rank}.pkl")
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])


def load(accelerator, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load model, optimizer and RNG states from ``path`` into the prepared objects; return
    ``(trainer state, this rank's state)``. Works on another number of processes than the
    checkpoint's (ranks are mapped onto the saved ones)."""
    verdict = inspect(path)
    if not verdict.ok:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {verdict.problem}")
    accelerator.load_state(str(path))
    state = read_state(path)
    written, rank = state["world_size"], accelerator.process_index
    if written == accelerator.num_processes:
        return state, json.loads((path / f"rank-{rank}.json").read_text())
    if rank >= written:
        _load_rng_of(path, rank % written)
    return state, _mean_rank_state(path, written)


def verify_run(run_dir: Path) -> tuple[list[str], bool]:
    """Lines describing every checkpoint and the final weights of a run; False if the newest
    checkpoint (or the final weights) cannot be used."""
    from .runs import WEIGHTS_FILE, weights_problem

    verdicts = scan(run_dir)
    lines = [f"{v.path.relative_to(run_dir)}: {v.describe()}" for v in verdicts]
    ok = not verdicts or verdicts[-1].ok
    for aside in sorted(checkpoints_dir(run_dir).glob("step-*.damaged-*")):  # replaced by a good save since
        lines.append(f"{aside.relative_to(run_dir)}: set aside: {inspect(aside).describe()}")
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
