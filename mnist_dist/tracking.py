"""What a run records: Weights & Biases through Accelerate's trackers, and the run's own history file.

``RUN_DIR/history.jsonl`` is written by the main process whatever the tracker: one JSON
object a line (``kind`` config, step, epoch or summary), the source of ``mnist-dist
report``. ``RUN_DIR/misclassified.safetensors`` keeps the first misclassified test digits.

wandb is imported only when the tracker is wandb, and only the main process talks to it.
It must never stop training: a failure becomes one warning and tracking goes on in
the history file alone. Without credentials the run is logged offline, for ``wandb sync``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import netrc
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

log = logging.getLogger("mnist_dist")

HISTORY_FILE, MISCLASSIFIED_FILE = "history.jsonl", "misclassified.safetensors"
MAX_MISCLASSIFIED = 64
# Bounds on wandb's waits, so an unreachable server costs at most this much (seconds).
# WANDB_INIT_TIMEOUT / WANDB_FINISH_TIMEOUT in the environment take precedence.
INIT_TIMEOUT, FINISH_TIMEOUT = 60.0, 60.0
# The main process waits for wandb's start at most its init timeout plus this (import, service start).
START_MARGIN = 30.0


def wandb_installed() -> bool:
    """Whether Accelerate will offer its wandb tracker (checked without importing wandb)."""
    from accelerate.utils import is_wandb_available

    return bool(is_wandb_available())


def accelerator_log_with(tracker: str) -> str | None:
    """``log_with`` for the Accelerator: "wandb" if asked for and installed, else None."""
    return "wandb" if tracker == "wandb" and wandb_installed() else None


def has_wandb_credentials() -> bool:
    """An API key, identity token or netrc entry for the wandb server is there (no network)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def default_group(run_dir: Path) -> str:
    """One group for every rank and every requeued restart of a job."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else run_dir.resolve().name


def run_config(cfg, accelerator) -> dict[str, Any]:
    """The merged config plus what the run ran on: world size, device, library versions."""
    versions = {"python": platform.python_version()}
    for dist in ("mnist-dist", "torch", "accelerate", "wandb"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {**cfg.to_dict(), "world_size": accelerator.num_processes,
            "device": accelerator.device.type, "versions": versions}


def misclassified_examples(predictions: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                           limit: int = MAX_MISCLASSIFIED) -> dict[str, torch.Tensor]:
    """The first ``limit`` wrongly predicted images (dataset order), on the CPU."""
    index = (predictions != labels).nonzero().flatten()[:limit]
    return {"images": images[index].cpu(), "predicted": predictions[index].cpu(),
            "label": labels[index].cpu(), "index": index.cpu()}


class Tracker:
    """Records a run. Call on every rank; only the main process writes or talks to wandb."""

    def __init__(self, cfg, accelerator, run_dir: Path) -> None:
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, Path(run_dir)
        self.is_main = accelerator.is_main_process
        self.wandb_on = False
        self._history = None
        self._starting: threading.Thread | None = None
        self._start_error: Exception | None = None
        self._start_lock = threading.Lock()
        self._abandoned = False
        self._resumed_id = None
        self._last_step = 0
        self._start = time.time()

    def start(self, config: dict[str, Any], resumed: dict[str, Any] | None = None) -> None:
        """Open the history file and start wandb if asked for.

        A fresh run starts the history afresh; a run resumed from a checkpoint (``resumed``:
        its trainer state) appends to it and continues the same wandb run.
        """
        if not self.is_main:
            return
        self._resumed_id = resumed and resumed.get("wandb_run_id")
        self._history = open(self.run_dir / HISTORY_FILE, "a" if resumed else "w", encoding="utf-8")
        if resumed:
            self._last_step = resumed["progress"]["step"]
            self._write({"kind": "resume", "step": self._last_step})
        self._write({"kind": "config", "config": config})
        if self.cfg.tracker != "wandb":
            return
        if not wandb_installed():
            log.warning("tracker 'wandb': the wandb package is not installed; continuing with tracker 'none'")
            return
        # wandb's import and start (about a second, most of it waiting for its service
        # process) overlap the data loading and model set-up; ``started()`` waits for them.
        self._starting = threading.Thread(target=self._start_wandb, args=(config,), name="wandb-start", daemon=True)
        self._starting.start()

    def _start_wandb(self, config: dict[str, Any]) -> None:
        try:
            init_kwargs = self._init_kwargs()
            self.accelerator.init_trackers(self.cfg.wandb_project, config=config, init_kwargs={"wandb": init_kwargs})
        except Exception as exc:  # wandb must never stop training
            self._start_error = exc
        with self._start_lock:
            if self._abandoned:  # too late: training went on without it
                self._drop_wandb()

    def started(self) -> None:
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
            log.warning("wandb did not start within %.0f s; training goes on without it, the history is in %s",
                        wait, self.run_dir / HISTORY_FILE)
            return
        if self._start_error is not None:
            self._fail("start", self._start_error)
            self._start_error = None
            return
        self.wandb_on = any(t.name == "wandb" for t in self.accelerator.trackers)

    def _init_kwargs(self) -> dict[str, Any]:
        import wandb

        wandb_dir = Path(self.cfg.wandb_dir) if self.cfg.wandb_dir else self.run_dir
        wandb_dir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {}
        # login_timeout bounds the API key prompt wandb shows on a terminal when online is forced without one.
        for key, seconds in (("init_timeout", INIT_TIMEOUT), ("login_timeout", INIT_TIMEOUT),
                             ("finish_timeout", FINISH_TIMEOUT)):
            if f"WANDB_{key.upper()}" not in os.environ:
                settings[key] = seconds
        kwargs: dict[str, Any] = {
            "dir": str(wandb_dir), "entity": self.cfg.wandb_entity, "name": self.cfg.wandb_run_name,
            "group": self.cfg.wandb_group or default_group(self.run_dir), "tags": list(self.cfg.wandb_tags),
        }
        if self._resumed_id:  # the same wandb run goes on
            kwargs.update(id=self._resumed_id, resume="allow")
        if not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_DISABLED")) and not has_wandb_credentials():
            kwargs["mode"] = "offline"
            settings["silent"] = True  # the line below says it all, once
            log.info("wandb: no credentials (WANDB_API_KEY or ~/.netrc), logging offline; upload later with: "
                     "wandb sync %s", wandb_dir / "wandb" / "offline-run-*")
        kwargs["settings"] = wandb.Settings(**settings)
        return kwargs

    @property
    def run_id(self) -> str | None:
        """The wandb run's id (main process, wandb on), kept in checkpoints to continue the run."""
        self.started()
        if not self.wandb_on:
            return None
        return self.accelerator.get_tracker("wandb", unwrap=True).id

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Training metrics at optimizer step ``step`` (main process only)."""
        self._log("step", step, metrics)

    def log_epoch(self, step: int, metrics: dict[str, float]) -> None:
        """End-of-epoch metrics, at the step the epoch ended on (main process only)."""
        self._log("epoch", step, metrics)

    def finish(self, summary: dict[str, Any], confusion: torch.Tensor, examples: dict[str, torch.Tensor]) -> None:
        """Final metrics, confusion matrix and misclassified digits: to the run directory and wandb."""
        if not self.is_main:
            return
        self.started()
        import safetensors.torch

        from .runs import atomic_write_bytes

        self._write({"kind": "summary", "step": self._last_step, **summary, "confusion_matrix": confusion.tolist()})
        self._history.close()
        tensors = {k: v.contiguous() for k, v in examples.items()}
        atomic_write_bytes(self.run_dir / MISCLASSIFIED_FILE, safetensors.torch.save(tensors))
        if not self.wandb_on:
            return
        try:
            import wandb

            from .report import misclassified_grid

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.summary.update(summary)
            n = len(confusion)  # wandb's chart wants one (true, predicted) pair per image
            cells = torch.arange(n * n).repeat_interleave(confusion.flatten())
            grid = misclassified_grid(examples["images"], examples["predicted"], examples["label"])
            self.accelerator.log({
                "test/confusion_matrix": wandb.plot.confusion_matrix(
                    y_true=(cells // n).tolist(), preds=(cells % n).tolist(), class_names=[str(c) for c in range(n)]),
                "test/misclassified": wandb.Image(grid, caption="predicted / true label"),
            }, step=self._last_step)
        except Exception as exc:
            self._fail("log the final results", exc)

    def end(self) -> None:
        """Close the trackers (wandb waits at most FINISH_TIMEOUT to upload). Every rank calls this last."""
        self.started()
        try:
            self.accelerator.end_training()
        except Exception as exc:
            if not self.wandb_on:
                raise
            self._fail("finish", exc)
            self.accelerator.end_training()  # the tracker is dropped: this only ends the process group

    def _log(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        step = max(step, self._last_step)  # wandb drops a step lower than the last one
        self._last_step = step
        self._write({"kind": kind, "step": step, **metrics})
        self.started()
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
        first_line = (str(exc).strip().splitlines() or [""])[0]
        log.warning("wandb failed to %s (%s: %s); training goes on, the history is in %s",
                    what, type(exc).__name__, first_line, self.run_dir / HISTORY_FILE)
        self.wandb_on = False
        self._drop_wandb()

    def _drop_wandb(self) -> None:
        # Drop the tracker so Accelerate's end_training does not call into a broken run.
        self.accelerator.trackers[:] = [t for t in self.accelerator.trackers if t.name != "wandb"]
