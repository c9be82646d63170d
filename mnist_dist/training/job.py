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
from ..distributed.runtime import build_accelerator, end_process_group, setup_logging, world_size_from_env
from ..distributed.watchdog import watchdog_for
from ..errors import DataError, PeerLostError, RunDirBusyError, Stopped, UserError, first_line
from ..runlock import RunLock
from ..tracking.tracker import Tracker, run_config
from ..tracking.wandb_run import accelerator_log_with, trial_config
from .build import build
from .checkpoint import CheckpointManager
from .preempt import StopFlags, requeue_slurm_job
from .trainer import Trainer

log = logging.getLogger("mnist_dist")


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
    cfg = trial_config(cfg)  # a wandb sweep trial: a run directory of its own
    per_process_batch_size(cfg, world_size_from_env())  # fail before any process group work
    run_dir = runs.prepare_run_dir(cfg.output_dir)
    accelerator = build_accelerator(cfg, log_with=accelerator_log_with(cfg.tracker))
    setup_logging(accelerator.is_main_process)
    lock = _lock_run_dir(accelerator, run_dir)  # before anything in run_dir is read or written
    watch = watchdog_for(run_dir, accelerator.process_index, accelerator.num_processes, cfg.stall_timeout)
    if lock is not None:
        watch.before_exit.append(lock.release)
    try:
        return _train(cfg, accelerator, run_dir, watch)
    finally:
        if lock is not None:
            lock.release()


def _peer_lost(exc: RuntimeError, watch, accelerator) -> PeerLostError:
    """The one line for a collective that failed because a peer died (said by the lowest survivor)."""
    lost = watch.lost_peers(wait=5.0)
    rank = accelerator.process_index
    named = "; ".join(lost.values()) if lost else "a peer (none could be named)"
    survivors = [r for r in range(accelerator.num_processes) if r not in lost]
    return PeerLostError(
        f"lost {named}: rank {rank} stopped at step {watch.step} ({first_line(exc)}); every rank ends "
        f"(exit status {PeerLostError.exit_code}); the same command resumes from the last checkpoint",
        quiet=rank != min(survivors),
    )


def _data_ready(cfg: Config, accelerator) -> None:
    """Each node's first process fetches and verifies the data before anything is written into the
    run directory; every rank learns of a failure (one gather), none waits for a rank that failed."""
    from accelerate.utils import gather_object

    from ..data.sources import ensure_dataset

    problem = None
    if accelerator.is_local_main_process:
        try:
            ensure_dataset(cfg.data_dir, cfg.dataset)
        except DataError as exc:
            problem = str(exc)
    if accelerator.num_processes > 1:
        problem = next((p for p in gather_object([problem]) if p), None)
    if problem is not None:
        raise DataError(problem)


def _end(tracker: Tracker, accelerator, stopped: bool = False) -> None:
    """Every rank, last: close the history and wandb (main process), then the process group this job started."""
    tracker.end(stopped)
    end_process_group(accelerator)


def _train(cfg: Config, accelerator, run_dir: Path, watch) -> dict[str, Any]:
    """Resume or start, train, and write the results, on every rank."""
    _data_ready(cfg, accelerator)
    checkpoints = CheckpointManager.from_config(cfg, accelerator, run_dir)
    point = checkpoints.resume_point()  # before anything in run_dir is written
    if accelerator.is_main_process:
        save_config(cfg, run_dir / runs.CONFIG_FILE, of_run=True)
    tracker = Tracker(cfg, accelerator, run_dir)
    if point is None:
        tracker.start(run_config(cfg, accelerator))
    else:
        tracker.start(run_config(cfg, accelerator), resumed=point.state, checkpoint=point.path)
    stop = StopFlags()
    try:
        trainer = Trainer(cfg, build(cfg, accelerator), accelerator, tracker, checkpoints, stop, watch)
        if point is not None:
            trainer.restore(point)
        model, metrics, _ = trainer.fit()
    except Stopped as exc:
        accelerator.print(exc)
        # The checkpoint is complete on every rank: requeue first, as SLURM may end the job soon.
        if exc.signum == signal.SIGUSR1 and cfg.requeue and accelerator.is_main_process:
            requeue_slurm_job()
        _end(tracker, accelerator, stopped=True)  # a sweep's wandb run: to be resumed
        raise
    except RuntimeError as exc:  # gloo / NCCL errors: a peer died in a collective
        if accelerator.num_processes == 1 or isinstance(exc, UserError):
            raise
        raise _peer_lost(exc, watch, accelerator) from None
    # Only here: after an error or a stop the handlers stay until the process ends, since a launcher
    # sends SIGTERM to every rank once one has ended, and it must not cut short the line saying why.
    stop.restore()
    _write_results(accelerator, run_dir, model, metrics)
    tracker.log_model()  # main process: the files just written, as a wandb artifact
    accelerator.wait_for_everyone()
    _end(tracker, accelerator)
    return metrics
