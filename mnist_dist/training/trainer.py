"""The training loop: one rank's part of a run, over objects that are already built.

In ``batch_mode: global`` every process takes ``batch_size / world_size`` samples of each
global batch and the gradients are averaged, so N processes follow the mathematics of
one. Each level is one method: ``train_step`` (one optimizer step), ``_train_epoch`` (the
steps of an epoch, with the log intervals), ``_epoch`` (train, evaluate, log, checkpoint),
``fit`` (the run).
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object, is_compiled_module

from ..config import parse_steps
from ..data.loaders import shard_sampler, to_inputs
from ..distributed.watchdog import Unwatched
from ..errors import Stopped
from ..evaluation import EvalResult, evaluate, misclassified_examples
from .build import TrainingParts
from .checkpoint import CheckpointManager, ResumePoint
from .meters import LossMeter, Position, Stopwatch, steady_step_seconds
from .preempt import StopFlags
from .profiling import StepProfiler, log_to_wandb
from .progress import ProgressDisplay
from .step import FiniteCheck, check_gradients, step_calls
from .system import SystemReadings, per_node
from .timing import RankTiming, Stragglers

log = logging.getLogger("mnist_dist")


def _hosts(accelerator) -> list[str] | None:
    """Every rank's host name, on the main process (several processes; one gather), else None."""
    if accelerator.num_processes == 1:
        return None
    hosts = gather_object([socket.gethostname()])
    return hosts if accelerator.is_main_process else None


def _probabilities_of(model: torch.nn.Module, device: torch.device):
    """``images -> class probabilities`` of ``model`` (a few uint8 images, no collective): for tracking."""

    @torch.no_grad()
    def probabilities(images: torch.Tensor) -> torch.Tensor:
        return model(to_inputs(images, device)).float().softmax(dim=1)

    return probabilities


class Trainer:
    """Trains ``parts`` on this rank: steps, evaluation after every epoch, checkpoints, stopping.

    Build it on every rank; ``restore`` a checkpoint if resuming; ``fit`` trains to the end
    or raises ``Stopped`` (after saving a checkpoint) when the ranks agreed to stop.
    """

    def __init__(
        self,
        cfg,
        parts: TrainingParts,
        accelerator,
        tracker,
        checkpoints: CheckpointManager,
        stop: StopFlags,
        watch=None,
    ) -> None:
        self.cfg, self.parts, self.accelerator = cfg, parts, accelerator
        self.tracker, self.checkpoints, self.stop = tracker, checkpoints, stop
        self.watch = watch or Unwatched()  # told where this rank is: a stall names the rank holding the run up
        self.model, self.optimizer, self.recipe = parts.model, parts.optimizer, parts.recipe
        self.world = accelerator.num_processes
        self.position = Position()
        self.losses = LossMeter(accelerator.device)
        self.clock = Stopwatch(self.position, accelerator.device)
        self.display = ProgressDisplay(accelerator.is_main_process, parts.global_batch)
        self._calls = step_calls(self.optimizer, accelerator)
        self._params = list(self.model.parameters())  # every one gets a gradient
        self.finite = FiniteCheck(cfg, accelerator.device)
        self.timing = RankTiming(accelerator.process_index, self.world)
        self.timing.time_gradient_allreduce(self.model, accelerator.device.type)
        # Several processes: every rank's timing and system readings travel in the log interval's all-reduce.
        several = self.world > 1
        self.readings = SystemReadings(accelerator.process_index, self.world, accelerator.device) if several else None
        self.hosts = _hosts(accelerator)
        self.stragglers = None if self.hosts is None else Stragglers(self.hosts)
        window = parse_steps(cfg.profile_steps)
        self.profiler = StepProfiler(checkpoints.run_dir, window, accelerator.process_index, accelerator.device.type)
        self.eval_seconds = 0.0

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where training is, as a checkpoint records it (``trainer_state.json``, the same on every rank)."""
        scheduler = self.recipe.scheduler
        return {
            "progress": asdict(self.position),
            "world_size": self.world,
            "config": self.cfg.to_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "wandb_run_id": self.tracker.run_id,
        }

    def load_state_dict(self, state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Take up ``state`` (see ``state_dict``) and this rank's loss sums (``rank_state``)."""
        self.position = Position(**state["progress"])
        self.clock.position = self.position
        if self.recipe.scheduler is not None:
            self.recipe.scheduler.load_state_dict(state["scheduler"])
        self.losses.load_state_dict(rank_state)

    def restore(self, point: ResumePoint) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG states, position, loss sums."""
        self.load_state_dict(point.state, self.checkpoints.load(point))
        p = self.position
        where = f"{p.batch} batches into epoch {p.epoch + 1}" if p.batch else f"{p.epoch} epochs done"
        log.info("resumed from %s: step %d, %s", point.path, p.step, where)

    def save_checkpoint(self):
        """Save where training is now (a collective: every rank calls it at the same step); never
        weights that took a non-finite step."""
        self.finite.verify(self.position.step, self.position.epoch)
        self._at("checkpoint")
        with self.clock.paused():  # the training time so far is counted in, the save's time is not
            path = self.checkpoints.save(self.state_dict(), self.losses.state_dict())
        log.debug("checkpoint %s saved (epoch %d, step %d)", path, self.position.epoch, self.position.step)
        return path

    def _stop(self, signum: int) -> Stopped:
        self.clock.stop()
        self.display.end_epoch()
        return Stopped(signum, self.position.step, self.save_checkpoint())

    # -- one step, one epoch, the run -----------------------------------------------------

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's part of a global batch; returns its loss (on the device)."""
        zero_grad, backward, step = self._calls
        logits = self.model(self.recipe.inputs(images, indices))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        zero_grad()
        backward(loss)
        check_gradients(self._params, self.cfg, self.finite, self.position.step, self.position.epoch)
        step()
        self.recipe.after_step()
        return loss

    def _at(self, phase: str, step: int | None = None) -> None:
        """This rank is now in ``phase``: for the stall watchdog and the per-rank timing."""
        self.watch.mark(phase, step)
        self.timing.enter(phase)

    def _reduce_loss_and_vote(
        self, value: torch.Tensor, extra: list[float] = ()
    ) -> tuple[float, int | None, list[float]]:
        """``value`` averaged over ranks, the signal (if any) all ranks stop for, and ``extra`` summed
        over ranks: one all-reduce."""
        self._at("collective")
        flags = self.stop.local()
        rest = torch.tensor([*flags, *extra], dtype=value.dtype, device=value.device)
        summed = self.accelerator.reduce(torch.cat([value.reshape(1), rest]), reduction="sum").tolist()
        return summed[0] / self.world, StopFlags.verdict(summed[1 : 1 + len(flags)]), summed[1 + len(flags) :]

    def _log_interval(self) -> None:
        """The interval's loss and every rank's timing, shared with the stop vote; raises ``Stopped`` if
        the ranks agreed to stop."""
        p = self.position
        self.finite.verify(p.step, p.epoch)
        timing = self.timing.take()
        ranks = timing + (self.readings.take() if self.readings else [])
        mean, signum, summed = self._reduce_loss_and_vote(self.losses.interval_mean(), ranks)
        rate = self.display.interval(p.step, mean, self.losses.interval_steps)
        metrics = {"train/loss": mean, "lr": self.optimizer.param_groups[0]["lr"], "train/samples_per_second": rate}
        per_rank = {}
        if self.hosts is not None:  # the main process of several
            timed, per_rank = self.stragglers.interval(summed[: len(timing)], self.losses.interval_steps)
            nodes, node_ranks = per_node(summed[len(timing) :], self.hosts)
            metrics.update(timed | nodes)
            per_rank.update(node_ranks)
        self.tracker.log_step(p.step, metrics, history_only=per_rank)
        self.losses.end_interval()
        # A stop agreed on at the very last step saves no time: the run ends as an unstopped one.
        if signum is not None and p.step < self.parts.total_steps:
            raise self._stop(signum)

    def _reached_max(self) -> bool:
        return self.cfg.max_steps is not None and self.position.step >= self.cfg.max_steps

    def _finished(self) -> bool:
        """All epochs done, or ``max_steps`` reached."""
        return self.position.epoch >= self.cfg.epochs or self._reached_max()

    def _train_epoch(self) -> tuple[float, int | None]:
        """Train the rest of the current epoch (or up to ``max_steps``); return its mean loss
        over all ranks and the signal, if any, that all ranks agreed to stop for at its end."""
        cfg, p, loader = self.cfg, self.position, self.parts.train_loader
        self.model.train()
        shard_sampler(loader).set_epoch(p.epoch)
        loader.batch_sampler.skip_next(p.batch)  # resumed mid-epoch: the batches not yet seen
        left = len(loader) - p.batch
        self.display.start_epoch(
            p.epoch + 1, cfg.epochs, left if cfg.max_steps is None else min(left, cfg.max_steps - p.step)
        )
        self.recipe.start_epoch(p.epoch)
        self.clock.start()
        self._at("data", p.step)
        for images, labels, indices in loader:
            self._at("compute")
            self.profiler.before_step(p.step + 1)
            self.losses.add(self.train_step(images, labels, indices))
            self.clock.step_done()
            p.step += 1
            self.profiler.after_step(p.step)
            p.batch += 1
            self.display.advance()
            if p.step % cfg.log_every == 0:
                self._log_interval()
            if self.checkpoints.due_after_step(p.step, p.batch >= len(loader), self._reached_max()):
                self.save_checkpoint()
            if self._reached_max():
                break
            self._at("data", p.step)
        self.clock.stop()
        self.display.end_epoch()
        self.finite.verify(p.step, p.epoch)
        # A step limit inside the epoch leaves it open: a larger limit later continues it exactly.
        finished_epoch = p.batch >= len(loader)
        return self._reduce_loss_and_vote(self.losses.end_epoch() if finished_epoch else self.losses.epoch_mean())[:2]

    def _evaluate(self) -> EvalResult:
        start = time.perf_counter()
        model = self.recipe.inference_model(self.model, self.accelerator)
        self._at("evaluation")
        result = evaluate(model, self.parts.eval_loader, self.accelerator, progress=self.watch.mark)
        self.eval_seconds = time.perf_counter() - start
        return result

    def _report_epoch(self, train_loss: float, result: EvalResult, seconds: float) -> None:
        """One log line and one tracker record for the epoch (or the part of it) just trained."""
        p, split, batches = self.position, self.parts.split, len(self.parts.train_loader)
        where = (
            f"{p.epoch + 1}/{self.cfg.epochs} ({p.batch} of {batches} batches)"
            if p.batch
            else f"{p.epoch}/{self.cfg.epochs}"
        )
        log.info(
            "epoch %s: train loss %.4f, %s accuracy %.2f%%, %s loss %.4f (step %d, %.1f s training)",
            where,
            train_loss,
            split,
            100 * result.accuracy,
            split,
            result.loss,
            p.step,
            p.train_seconds,
        )
        self.tracker.log_epoch(
            p.step,
            {
                "epoch": p.epoch + p.batch / batches,  # fractional after a step limit inside an epoch
                "train/epoch_loss": train_loss,
                f"{split}/accuracy": result.accuracy,
                f"{split}/loss": result.loss,
                "epoch_seconds": seconds,
            },
        )

    def _epoch(self) -> EvalResult:
        """One epoch (or its part up to the step limit): train, evaluate, log; then stop, or save, as due."""
        p = self.position
        epoch_start = time.perf_counter()
        train_loss, signum = self._train_epoch()
        if p.batch >= len(self.parts.train_loader):
            p.epoch += 1
            p.batch = 0
        result = self._evaluate()
        self._report_epoch(train_loss, result, time.perf_counter() - epoch_start)
        last = self._finished()
        if signum is not None and not last:
            raise self._stop(signum)
        if signum is not None:
            log.info("%s at the last step: finishing the run normally", signal.Signals(signum).name)
        if self.checkpoints.due_after_epoch(p.step, p.epoch, last):
            self.save_checkpoint()
        return result

    def _announce(self) -> None:
        cfg, parts = self.cfg, self.parts
        if self._finished():
            log.info("training ended at this checkpoint (step %d): evaluating it", self.position.step)
            return
        length = f"{cfg.epochs} epochs" if cfg.max_steps is None else f"{cfg.epochs} epochs or {cfg.max_steps} steps"
        log.info(
            "training %s on %d process(es) (%s): global batch %d (%d per process), lr %g, %s",
            cfg.dataset,
            self.world,
            self.accelerator.device.type,
            parts.global_batch,
            parts.per_process,
            parts.lr,
            length,
        )

    def metrics(self, result: EvalResult) -> dict[str, Any]:
        """What ``metrics.json`` records: the last evaluation, and how the run was trained."""
        split, p = self.parts.split, self.position
        return {
            **{key.replace("test_", f"{split}_", 1): value for key, value in result.metrics().items()},
            "eval_split": split,
            "world_size": self.world,
            "train_seconds": p.train_seconds,
            # the warm-up (each start's first steps: start-up, compilation) and the steady step time after it
            "warmup_steps": p.warmup_steps,
            "warmup_seconds": p.warmup_seconds,
            "steady_step_seconds": steady_step_seconds(p),
            "eval_seconds": self.eval_seconds,  # the last evaluation of the whole evaluation set
            "epochs": round(p.epoch + p.batch / len(self.parts.train_loader), 4),  # a step limit: a fraction
            "steps": p.step,
            "global_batch_size": self.parts.global_batch,
            "per_process_batch_size": self.parts.per_process,
            "lr": self.parts.lr,
            "device": self.accelerator.device.type,
            "compiled": is_compiled_module(self.model),  # False where --compile fell back to eager
        }

    def _attach_profiles(self) -> None:
        """The profiler traces of every rank (written by now) to the wandb run, once."""
        if self.cfg.profile_steps:
            self.accelerator.wait_for_everyone()
            log_to_wandb(self.tracker.wandb_run(), self.checkpoints.run_dir)

    def fit(self) -> tuple[torch.nn.Module, dict[str, Any], EvalResult]:
        """Train and evaluate after every epoch; return the model to save, the metrics, the last evaluation."""
        self._announce()
        self.tracker.wait_started()  # not during the training steps: wandb's start would compete for the CPU
        result = None
        self.watch.start()
        try:
            while not self._finished():
                result = self._epoch()
            if result is None:  # resumed from the checkpoint at the end of training
                result = self._evaluate()
        finally:
            self.watch.stop()  # before wandb's finish, which may take its time on the main process
            self.profiler.close()  # a window still open: its trace is written now
        self._attach_profiles()
        metrics = self.metrics(result)
        if metrics["steady_step_seconds"] is not None:
            log.info(
                "%.1f s training: warm-up %.2f s over %d steps (each start's first), then %.3f ms per step",
                metrics["train_seconds"],
                metrics["warmup_seconds"],
                metrics["warmup_steps"],
                1000 * metrics["steady_step_seconds"],
            )
        eval_set = self.parts.eval_set
        trained = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        final = self.recipe.inference_model(trained, self.accelerator)
        probabilities = _probabilities_of(final, self.accelerator.device)  # for the tracker's table
        examples = misclassified_examples(result.predictions, eval_set.images, eval_set.labels, probabilities)
        self.tracker.finish(metrics, result.confusion, examples)
        return final, metrics, result
