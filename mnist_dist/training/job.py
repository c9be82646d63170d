"""A whole training job: the run directory, the Accelerator, resuming, training, the results.

``mnist-dist train``, ``python -m mnist_dist.train`` and ``accelerate launch -m
mnist_dist.train`` all end up in ``run``, on every process of the job.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

from .. import runs
from ..config import Config, per_process_batch_size, save_config
from ..distributed.runtime import build_accelerator, setup_logging, world_size_from_env
from ..errors import RunDirBusyError, Stopped
from ..runlock import RunLock
from ..tracking.tracker import Tracker, run_config
from ..tracking.wandb_run import accelerator_log_with
from .build import build
from .checkpoint import Checkpointer
from .preempt import StopFlags, requeue_slurm_job
from .resume import check_compatible, resolve_on_main
from .trainer import Trainer

log = logging.getLogger("mnist_dist")


def _resume_point(cfg: Config, accelerator, run_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to continue from and its trainer state (both None for a fresh start), checked."""
    from .integrity import read_state

    path = resolve_on_main(accelerator, cfg, run_dir)  # before anything in run_dir is written
    if path is None:
        return None, None
    state = read_state(path)
    note = check_compatible(state, cfg, accelerator.num_processes, path)
    if note:
        log.info(note)
    return path, state


def _write_results(accelerator, run_dir: Path, model, metrics: dict[str, Any]) -> None:
    """The final weights, and the metrics with the weights' checksum (main process); one line on stdout."""
    if accelerator.is_main_process:
        digest = runs.save_weights(model.state_dict(), run_dir / runs.WEIGHTS_FILE)
        runs.write_json(run_dir / runs.METRICS_FILE, {**metrics, "weights_sha256": digest})
    split = metrics["eval_split"]
    accelerator.print(
        f"{split} accuracy: {100 * metrics[f'{split}_accuracy']:.2f}% "
        f"({metrics[f'{split}_correct']}/{metrics[f'{split}_total']}); run directory: {run_dir}"
    )


def _lock_run_dir(accelerator, run_dir: Path) -> RunLock | None:
    """The main process takes the run directory's lock; every rank learns whether it could (one broadcast)."""
    lock, problem = None, [None]
    if accelerator.is_main_process:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunDirBusyError as exc:
            lock, problem = None, [str(exc)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem)
    if problem[0] is not None:
        raise RunDirBusyError(problem[0])
    return lock


def run(cfg: Config) -> dict[str, Any]:
    """The whole job: lock the run directory, train (or resume), write config, metrics and weights."""
    per_process_batch_size(cfg, world_size_from_env())  # fail before any process group work
    run_dir = runs.prepare_run_dir(cfg.output_dir)
    accelerator = build_accelerator(cfg, log_with=accelerator_log_with(cfg.tracker))
    setup_logging(accelerator.is_main_process)
    lock = _lock_run_dir(accelerator, run_dir)  # before anything in run_dir is read or written
    try:
        return _train(cfg, accelerator, run_dir)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, accelerator, run_dir: Path) -> dict[str, Any]:
    """Resume or start, train, and write the results, on every rank."""
    resume_from, resumed = _resume_point(cfg, accelerator, run_dir)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / runs.CONFIG_FILE, of_run=True)
    tracker = Tracker(cfg, accelerator, run_dir)
    tracker.start(run_config(cfg, accelerator), resumed, resume_from)
    stop = StopFlags()
    try:
        trainer = Trainer(
            cfg,
            build(cfg, accelerator),
            accelerator,
            tracker,
            Checkpointer.from_config(cfg, accelerator, run_dir),
            stop,
        )
        if resume_from is not None:
            trainer.restore(resume_from)
        model, metrics, _ = trainer.fit()
    except Stopped as exc:
        accelerator.print(exc)
        # The checkpoint is complete on every rank: requeue first, as SLURM may end the job soon.
        if exc.signum == signal.SIGUSR1 and cfg.requeue and accelerator.is_main_process:
            requeue_slurm_job()
        tracker.end()  # every rank: closes wandb, ends the process group
        raise
    finally:
        stop.restore()
    _write_results(accelerator, run_dir, model, metrics)
    accelerator.wait_for_everyone()
    tracker.end()  # on every rank: closes wandb (main process), ends the process group
    return metrics
