"""What a run records: Weights & Biases through Accelerate's trackers, and the run's own history file.

``RUN_DIR/history.jsonl`` is written by the main process whatever the tracker: one JSON
object a line (``kind`` config, resume, step, epoch or summary), the source of ``mnist-dist
report``. ``RUN_DIR/misclassified.safetensors`` keeps the first misclassified test digits.

A resumed run reads as one run: the history is cut back to the checkpoint's step (what a
crashed timeline logged after it is dropped, then logged again), and the same wandb run
goes on, rewound to that step when it had gone past it (wandb's ``resume_from``).

wandb is imported only when the tracker is wandb, and only the main process talks to it.
It must never stop training: a failure becomes one warning and tracking goes on in
the history file alone. Without credentials the run is logged offline, for ``wandb sync``;
so is a run meant to be online whose server cannot be reached at its start (same run id).
At the end the run directory's final files become the run's model artifact (``artifacts.py``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed.runtime import versions
from ..errors import first_line
from ..runs import HISTORY_FILE, MISCLASSIFIED_FILE, atomic_write_bytes
from .history import one_timeline, read_history, rewind
from .wandb_run import (
    INIT_TIMEOUT,
    agent_run_id,
    can_fall_back_offline,
    choose_run,
    offline_kwargs,
    wandb_installed,
)
from .wandb_run import init_kwargs as wandb_init_kwargs

log = logging.getLogger("mnist_dist")

# The main process waits for wandb's start at most its init timeout plus this (import, service start).
START_MARGIN = 30.0


def run_config(cfg, accelerator) -> dict[str, Any]:
    """The merged config plus what the run ran on: world size, device, library versions."""
    return {
        **cfg.to_dict(),
        "world_size": accelerator.num_processes,
        "device": accelerator.device.type,
        "versions": versions(),
    }


def wandb_summary(metrics: dict[str, Any], split: str) -> dict[str, Any]:
    """``metrics.json``'s figures under the names the dashboard logs them by: ``test_accuracy`` is
    ``test/accuracy`` (one name per metric in the run's summary), the rest as they are."""
    prefix = f"{split}_"
    return {f"{split}/{k[len(prefix) :]}" if k.startswith(prefix) else k: v for k, v in metrics.items()}


class Tracker:
    """Records a run. Call on every rank; only the main process writes or talks to wandb."""

    def __init__(self, cfg, accelerator, run_dir: Path) -> None:
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, Path(run_dir)
        self.is_main = accelerator.is_main_process
        self.wandb_on = False
        self.wandb_id: str | None = None  # the wandb run this run logs to (main process)
        self._wandb_how = "new"  # new, resume (continue it) or rewind (to _last_step, then continue)
        self._history = None
        self._starting: threading.Thread | None = None
        self._start_error: Exception | None = None
        self._start_lock = threading.Lock()
        self._abandoned = False
        self._last_step = 0
        self._start = time.time()

    def start(
        self, config: dict[str, Any], resumed: dict[str, Any] | None = None, checkpoint: Path | None = None
    ) -> None:
        """Open the history file and start wandb if asked for.

        A fresh run starts the history afresh. A run resumed from ``checkpoint`` (``resumed``:
        its trainer state) keeps the history up to the checkpoint's step and continues the
        checkpoint's wandb run, rewinding it if a lost timeline had logged past that step.
        """
        if not self.is_main:
            return
        path = self.run_dir / HISTORY_FILE
        try:
            previous = read_history(path)
        except ValueError as exc:  # a damaged history must not stop training: keep it aside, start anew
            aside = path.with_name(f"{path.name}.unreadable")
            os.replace(path, aside)
            log.warning("%s; kept as %s, and a new history starts", exc, aside)
            previous = []
        self._last_step = resumed["progress"]["step"] if resumed else 0
        self.wandb_id, self._wandb_how = choose_run(
            self.cfg, self.run_dir, self._last_step, resumed, previous, checkpoint
        )
        kept = rewind(one_timeline(previous), self._last_step) if resumed else []
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        self._history = open(path, "a", encoding="utf-8")
        if resumed:
            self._write({"kind": "resume", "step": self._last_step})
        self._write({"kind": "config", "config": config, "wandb_run_id": self.wandb_id})
        if self.cfg.tracker != "wandb":
            return
        if not wandb_installed():
            log.warning("tracker 'wandb': the wandb package is not installed; continuing with tracker 'none'")
            return
        # wandb's import and start (about a second, most of it waiting for its service
        # process) overlap the data loading and model set-up; ``wait_started()`` waits for them.
        self._starting = threading.Thread(target=self._start_wandb, args=(config,), name="wandb-start", daemon=True)
        self._starting.start()

    def _start_wandb(self, config: dict[str, Any]) -> None:
        try:
            self._init_wandb(config)
        except Exception as exc:  # wandb must never stop training
            self._start_error = exc
        with self._start_lock:
            if self._abandoned:  # too late: training went on without it
                self._drop_wandb()

    def _init_wandb(self, config: dict[str, Any]) -> None:
        """Start the wandb run; a rewind the server refuses becomes a continuation, and a server that
        cannot be reached an offline record of the same run (for ``wandb sync``)."""
        init_kwargs = wandb_init_kwargs(self.cfg, self.run_dir, self.wandb_id, self._wandb_how, self._last_step)
        try:
            return self._init_trackers(config, init_kwargs)
        except Exception as exc:
            failure = exc
        if "resume_from" in init_kwargs:
            # Rewinding is a newer wandb feature, not on every server or account: continue the run instead.
            log.warning(
                "wandb could not rewind run %s to step %d (%s); continuing it instead: wandb keeps "
                "what it got past that step and ignores the repeated steps until they pass it",
                self.wandb_id,
                self._last_step,
                first_line(failure),
            )
            init_kwargs = {k: v for k, v in init_kwargs.items() if k != "resume_from"}
            init_kwargs.update(id=self.wandb_id, resume="allow")
            try:
                return self._init_trackers(config, init_kwargs)
            except Exception as exc:
                failure = exc
        if not can_fall_back_offline(init_kwargs):
            raise failure
        self._init_offline(config, init_kwargs, failure)

    def _init_offline(self, config: dict[str, Any], init_kwargs: dict[str, Any], failure: Exception) -> None:
        """The same run, recorded on disk: one warning with the command that uploads it later."""
        import wandb

        wandb.teardown()  # the failed online start still holds the run id in wandb's service process
        try:
            self._init_trackers(config, offline_kwargs(init_kwargs, self.wandb_id))
        except Exception:
            raise failure from None  # offline failed too: the online error is the one to explain
        record = Path(self.accelerator.get_tracker("wandb", unwrap=True).dir).parent
        log.warning(
            "wandb could not start online (%s: %s); logging run %s offline instead; upload later with: wandb sync %s",
            type(failure).__name__,
            first_line(failure),
            self.wandb_id,
            record,
        )

    def _init_trackers(self, config: dict[str, Any], init_kwargs: dict[str, Any]) -> None:
        self._drop_wandb()  # a tracker left by a failed attempt would be started again with it
        if "settings" in init_kwargs:  # wandb.init writes into its Settings: each attempt gets its own
            init_kwargs = {**init_kwargs, "settings": init_kwargs["settings"].model_copy(deep=True)}
        self.accelerator.init_trackers(self.cfg.wandb_project, config=config, init_kwargs={"wandb": init_kwargs})

    def wait_started(self) -> None:
        """Wait until wandb has started (or failed to: one warning), at most its init timeout plus
        START_MARGIN. Every use of wandb calls this first; the training loop calls it before its first step."""
        if self._starting is None:
            return
        wait = float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT)) + START_MARGIN
        self._starting.join(wait)
        with self._start_lock:
            self._abandoned = self._starting.is_alive()
        self._starting = None
        if self._abandoned:
            log.warning(
                "wandb did not start within %.0f s; training goes on without it, the history is in %s",
                wait,
                self.run_dir / HISTORY_FILE,
            )
            return
        if self._start_error is not None:
            self._fail("start", self._start_error)
            self._start_error = None
            return
        self.wandb_on = any(t.name == "wandb" for t in self.accelerator.trackers)

    def wandb_run(self):
        """The live wandb run (main process, tracker wandb, started), else None: to attach files to it."""
        self.wait_started()
        return self.accelerator.get_tracker("wandb", unwrap=True) if self.is_main and self.wandb_on else None

    @property
    def run_id(self) -> str | None:
        """The wandb run's id (main process, tracker wandb), kept in checkpoints to continue the run."""
        return self.wandb_id

    def log_step(self, step: int, metrics: dict[str, float], history_only: dict[str, Any] | None = None) -> None:
        """Training metrics at optimizer step ``step`` (main process only); ``history_only``: kept in
        the history file, not sent to wandb (per-rank lists)."""
        self._log("step", step, metrics, history_only)

    def log_epoch(self, step: int, metrics: dict[str, float]) -> None:
        """End-of-epoch metrics, at the step the epoch ended on (main process only)."""
        self._log("epoch", step, metrics)

    def finish(self, summary: dict[str, Any], confusion: torch.Tensor, examples: dict[str, torch.Tensor]) -> None:
        """Final metrics, confusion matrix and misclassified digits (a grid and a table): to the run
        directory and wandb."""
        if not self.is_main:
            return
        self.wait_started()
        import safetensors.torch

        self._write({"kind": "summary", "step": self._last_step, **summary, "confusion_matrix": confusion.tolist()})
        tensors = {k: v.contiguous() for k, v in examples.items()}
        atomic_write_bytes(self.run_dir / MISCLASSIFIED_FILE, safetensors.torch.save(tensors))
        if not self.wandb_on:
            return
        from .pictures import final_charts

        split = summary.get("eval_split", "test")
        try:
            self.accelerator.get_tracker("wandb", unwrap=True).summary.update(wandb_summary(summary, split))
            self.accelerator.log(final_charts(confusion, examples, split), step=self._last_step)
        except Exception as exc:
            self._fail("log the final results", exc)

    def log_model(self) -> None:
        """The final weights, config and metrics of the run directory as a ``model`` artifact (main
        process, after they are written, before ``end``); once per weights, however often the run resumes."""
        if not self.is_main or self.wandb_run() is None:
            return
        from .artifacts import log_model_artifact

        try:
            logged = log_model_artifact(self.wandb_run(), self.run_dir, self.cfg.to_dict())
        except Exception as exc:
            self._fail("log the model", exc)
            return
        if logged:
            self._write({"kind": "artifact", "step": self._last_step, **logged})

    def end(self, stopped: bool = False) -> None:
        """Close the history and the trackers (wandb waits at most FINISH_TIMEOUT to upload). Every rank
        calls this last. ``stopped``: the run stopped with a checkpoint to resume from; a sweep trial's
        wandb run is then marked preempting, so that the sweep hands it to an agent again, which resumes it."""
        self.wait_started()
        if stopped:
            self._mark_preempting()
        if self._history is not None:
            self._history.close()
        for tracker in list(self.accelerator.trackers):
            try:
                tracker.finish()
            except Exception as exc:
                if tracker.name != "wandb":
                    raise
                self._fail("finish", exc)

    def _mark_preempting(self) -> None:
        if not self.is_main or agent_run_id() is None or self.wandb_run() is None:
            return
        try:
            self.wandb_run().mark_preempting()
        except Exception as exc:
            self._fail("mark the run preempted", exc)

    def _log(self, kind: str, step: int, metrics: dict[str, float], history_only: dict[str, Any] | None = None) -> None:
        if not self.is_main:
            return
        step = max(step, self._last_step)  # wandb drops a step lower than the last one
        self._last_step = step
        self._write({"kind": kind, "step": step, **metrics, **(history_only or {})})
        self.wait_started()
        if self.wandb_on:
            try:
                self.accelerator.log(metrics, step=step)
            except Exception as exc:
                self._fail("log", exc)

    def _write(self, record: dict[str, Any]) -> None:
        record["time"] = round(time.time() - self._start, 3)
        self._history.write(json.dumps(record) + "\n")
        self._history.flush()  # a crashed run keeps its history up to the last line

    def _fail(self, what: str, exc: Exception) -> None:
        log.warning(
            "wandb failed to %s (%s: %s); training goes on, the history is in %s",
            what,
            type(exc).__name__,
            first_line(exc),
            self.run_dir / HISTORY_FILE,
        )
        self.wandb_on = False
        self._drop_wandb()

    def _drop_wandb(self) -> None:
        # Drop the tracker so that nothing calls into a broken run again.
        self.accelerator.trackers[:] = [t for t in self.accelerator.trackers if t.name != "wandb"]
