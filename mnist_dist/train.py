"""Training: the same loop on 1 or N processes, CPU or GPU, launched by Accelerate.

Run it with ``accelerate launch [options] -m mnist_dist.train [options]``,
``python -m mnist_dist.train`` or ``mnist-dist train``. In ``batch_mode: global`` every
process takes ``batch_size / world_size`` samples of each global batch and gradients
are averaged, so N processes follow the mathematics of one.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint, runs
from .config import Config, effective_lr, global_batch_size, per_process_batch_size, save_config
from .evaluate import EvalResult, evaluate
from .loaders import make_loader, shard_sampler
from .model import MLP
from .preempt import StopFlags, Stopped, requeue_slurm_job
from .progress import ProgressDisplay
from .recipe import Recipe, hold_out
from .runtime import build_accelerator, load_datasets, setup_logging, world_size_from_env
from .schedule import total_steps
from .tracking import Tracker, accelerator_log_with, misclassified_examples, run_config

log = logging.getLogger("mnist_dist")


@dataclass
class Progress:
    """Where training is: optimizer steps and epochs done, batches done in the current
    epoch, time spent in training steps."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    train_seconds: float = 0.0


def build_optimizer(model: torch.nn.Module, cfg: Config, world_size: int) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(),
        lr=effective_lr(cfg, world_size),
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def step_calls(optimizer, accelerator):
    """The ``(zero_grad, backward, step)`` functions of the training loop.

    Accelerate 1.15's ``AcceleratedOptimizer.step`` looks up an optional package through
    importlib twice per call (``is_lomo_available``), ``zero_grad`` inspects a signature
    per call, and ``Accelerator.backward`` divides the loss by the accumulation steps (one
    more kernel and autograd node, even for 1): about 0.3 ms per step on a 2-core CPU, a
    third of this model's whole step. When the wrappers have nothing to add (no fp16 grad
    scaler, no XLA, DeepSpeed or Megatron, no gradient accumulation) their calls are
    exactly the wrapped ones, so use those directly.
    """
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", None)
    if (
        inner is None
        or getattr(optimizer, "scaler", None) is not None
        or accelerator.scaler is not None
        or accelerator.distributed_type in (DistributedType.XLA, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        or accelerator.gradient_accumulation_steps != 1
    ):
        return (lambda: optimizer.zero_grad(set_to_none=True)), accelerator.backward, optimizer.step
    return (lambda: inner.zero_grad(set_to_none=True)), (lambda loss: loss.backward()), inner.step


class NonFiniteError(RuntimeError):
    """Training diverged: the gradients of a step are NaN or infinite."""


def check_gradients(params: list[torch.nn.Parameter], cfg: Config, progress: Progress) -> None:
    """Clip the gradients if asked; refuse non-finite ones before the optimizer step.

    The gradients are already averaged over ranks (DDP's all-reduce), and one rank's NaN
    makes the average NaN everywhere: every rank reaches the same verdict at the same
    step, with no extra collective. Without clipping the check reads only the output
    layer's bias gradient (10 numbers, the last of ``params``): for cross-entropy it is
    ``mean(softmax(logits) - target)``, non-finite exactly when some rank's logits, and so
    its loss, are. A full gradient norm would cost this model a tenth of its step; with
    clipping it is computed anyway, and checked.
    """
    if not (cfg.check_finite or cfg.grad_clip):
        return

    def grad_norm() -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    norm = grad_norm() if cfg.grad_clip else None
    probe = params[-1].grad if norm is None else norm
    if cfg.check_finite and not bool(torch.isfinite(probe).all()):
        raise NonFiniteError(
            f"the loss is not finite at step {progress.step + 1} (epoch {progress.epoch + 1}): gradient norm "
            f"{float(grad_norm() if norm is None else norm)}; training stopped before that step changed the weights. Lower the learning "
            f"rate (lr is {cfg.lr}) or clip gradients, e.g. --grad-clip 1.0"
        )
    if cfg.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm, foreach=True)


class Trainer:
    """One rank's part of a run: the loop, evaluation after every epoch, checkpoints, stopping.

    Build it on every rank; ``restore`` a checkpoint if resuming; ``fit`` trains to the end
    or raises ``Stopped`` (after saving a checkpoint) when a rank was signalled.
    """

    def __init__(self, cfg: Config, accelerator, tracker: Tracker, run_dir, stop: StopFlags) -> None:
        from accelerate.utils import set_seed

        self.cfg, self.accelerator, self.tracker, self.run_dir, self.stop = cfg, accelerator, tracker, run_dir, stop
        self.world = world = accelerator.num_processes
        self.per_process = per_process_batch_size(cfg, world)
        self.global_batch, self.lr = global_batch_size(cfg, world), effective_lr(cfg, world)
        train_set, test_set = load_datasets(cfg, accelerator)
        # split: "test", or "val" for a hold-out of the training set
        self.train_set, self.test_set, self.split = hold_out(train_set, test_set, cfg.val_size)

        set_seed(cfg.seed)  # same initial weights on every rank
        model = MLP(cfg.hidden_sizes)
        sgd = build_optimizer(model, cfg, world)
        # Only model and optimizer go through prepare: the loaders are sharded already.
        self.model, self.optimizer = accelerator.prepare(model, sgd)
        shard = dict(num_replicas=world, rank=accelerator.process_index, seed=cfg.seed)
        self.train_loader = make_loader(self.train_set, self.per_process, shuffle=cfg.shuffle, **shard)
        self.test_loader = make_loader(self.test_set, cfg.eval_batch_size, shuffle=False, **shard)
        self.total_steps = total_steps(cfg.epochs, len(self.train_loader), cfg.max_steps)  # the same on every rank
        self.recipe = Recipe(cfg, sgd, self.train_set, self.total_steps, accelerator.device)
        self.progress = Progress()
        self.display = ProgressDisplay(accelerator.is_main_process, self.global_batch)
        # Loss sums stay on the device (no host synchronisation until a log interval).
        device = accelerator.device
        self.interval_loss, self.epoch_loss = torch.zeros((), device=device), torch.zeros((), device=device)
        self.interval_steps = self.epoch_steps = 0

    # -- checkpoints --------------------------------------------------------------------

    def restore(self, path) -> None:
        """Continue from checkpoint ``path``: weights, optimizer, RNG states, position, loss sums."""
        state, mine = checkpoint.load(self.accelerator, path)
        self.progress = Progress(**state["progress"])
        if self.recipe.scheduler is not None:
            self.recipe.scheduler.load_state_dict(state["scheduler"])
        self.interval_loss.fill_(mine["interval_loss"])
        self.epoch_loss.fill_(mine["epoch_loss"])
        self.interval_steps, self.epoch_steps = mine["interval_steps"], mine["epoch_steps"]
        p = self.progress
        where = f"{p.batch} batches into epoch {p.epoch + 1}" if p.batch else f"{p.epoch} epochs done"
        log.info("resumed from %s: step %d, %s", path, p.step, where)

    def save_checkpoint(self):
        """Save where training is now (a collective: every rank calls it at the same step)."""
        scheduler = self.recipe.scheduler
        state = {
            "progress": asdict(self.progress),
            "world_size": self.world,
            "config": self.cfg.to_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "wandb_run_id": self.tracker.run_id,
        }
        mine = {
            "interval_loss": self.interval_loss.item(),
            "interval_steps": self.interval_steps,
            "epoch_loss": self.epoch_loss.item(),
            "epoch_steps": self.epoch_steps,
        }
        path = checkpoint.save(self.accelerator, self.run_dir, state, mine, self.cfg.keep_checkpoints)
        log.debug("checkpoint %s saved (epoch %d, step %d)", path, self.progress.epoch, self.progress.step)
        return path

    def _stopped(self, signum: int) -> Stopped:
        self.display.end_epoch()
        return Stopped(signum, self.progress.step, self.save_checkpoint())

    # -- the loop -----------------------------------------------------------------------

    def _share(self, value: torch.Tensor) -> tuple[float, int | None]:
        """``value`` averaged over ranks, and the signal (if any) all ranks stop for: one all-reduce."""
        flags = torch.tensor(self.stop.local(), dtype=value.dtype, device=value.device)
        summed = self.accelerator.reduce(torch.cat([value.reshape(1), flags]), reduction="sum").tolist()
        return summed[0] / self.world, StopFlags.verdict(summed[1:])

    def _checkpoint_due(self) -> bool:
        return bool(self.cfg.checkpoint_every) and self.progress.step % self.cfg.checkpoint_every == 0

    def _reached_max(self) -> bool:
        return self.cfg.max_steps is not None and self.progress.step >= self.cfg.max_steps

    def _finished(self) -> bool:
        """All epochs done, or ``max_steps`` reached."""
        return self.progress.epoch >= self.cfg.epochs or self._reached_max()

    def _train_epoch(self) -> tuple[float, int | None]:
        """Train the rest of the current epoch (or up to ``max_steps``).

        Returns the epoch's mean training loss over all ranks and the signal, if any, that
        all ranks agreed to stop for at the epoch's end. A signal agreed on at a log
        interval saves a checkpoint there and raises ``Stopped``.
        """
        cfg, p, accelerator = self.cfg, self.progress, self.accelerator
        self.model.train()
        zero_grad, backward, step = step_calls(self.optimizer, self.accelerator)
        params = list(self.model.parameters())  # every one gets a gradient
        shard_sampler(self.train_loader).set_epoch(p.epoch)
        self.train_loader.batch_sampler.skip_next(p.batch)  # resumed mid-epoch: the batches not yet seen
        left = len(self.train_loader) - p.batch
        if cfg.max_steps is not None:
            left = min(left, cfg.max_steps - p.step)
        self.display.start_epoch(p.epoch + 1, cfg.epochs, left)
        self.recipe.start_epoch(p.epoch)
        clock = time.perf_counter()
        for images, labels, indices in self.train_loader:
            loss = F.cross_entropy(
                self.model(self.recipe.inputs(images, indices)), labels, label_smoothing=cfg.label_smoothing
            )
            zero_grad()
            backward(loss)
            check_gradients(params, cfg, p)
            step()
            self.recipe.after_step()
            p.step += 1
            p.batch += 1
            self.display.advance()
            self.interval_loss += loss.detach()
            self.interval_steps += 1
            if p.step % cfg.log_every == 0:
                mean, signum = self._share(self.interval_loss / self.interval_steps)
                rate = self.display.interval(p.step, mean, self.interval_steps)
                self.tracker.log_step(
                    p.step,
                    {"train/loss": mean, "lr": self.optimizer.param_groups[0]["lr"], "train/samples_per_second": rate},
                )
                self.epoch_loss += self.interval_loss
                self.epoch_steps += self.interval_steps
                self.interval_loss.zero_()
                self.interval_steps = 0
                # A stop agreed on at the very last step saves no time: the run ends as an unstopped one.
                if signum is not None and p.step < self.total_steps:
                    p.train_seconds += time.perf_counter() - clock
                    raise self._stopped(signum)
            if self._checkpoint_due() and p.batch < len(self.train_loader) and not self._reached_max():
                p.train_seconds += time.perf_counter() - clock
                self.save_checkpoint()
                clock = time.perf_counter()
            if self._reached_max():
                break
        p.train_seconds += time.perf_counter() - clock
        self.display.end_epoch()
        self.epoch_loss += self.interval_loss
        self.epoch_steps += self.interval_steps
        mean, signum = self._share(self.epoch_loss / max(self.epoch_steps, 1))
        self.interval_loss.zero_()
        self.epoch_loss.zero_()
        self.interval_steps = self.epoch_steps = 0
        return mean, signum

    def _evaluate(self) -> EvalResult:
        start = time.perf_counter()
        result = evaluate(self.recipe.inference_model(self.model, self.accelerator), self.test_loader, self.accelerator)
        self.eval_seconds = time.perf_counter() - start
        return result

    def fit(self) -> tuple[torch.nn.Module, dict[str, Any], EvalResult]:
        """Train and evaluate after every epoch; return the unwrapped model, metrics, last evaluation."""
        cfg, p, split = self.cfg, self.progress, self.split
        if self._finished():
            log.info("training ended at this checkpoint (step %d): evaluating it", p.step)
        else:
            log.info(
                "training %s on %d process(es) (%s): global batch %d (%d per process), lr %g, %s",
                cfg.dataset,
                self.world,
                self.accelerator.device.type,
                self.global_batch,
                self.per_process,
                self.lr,
                f"{cfg.epochs} epochs" if cfg.max_steps is None else f"{cfg.epochs} epochs or {cfg.max_steps} steps",
            )
        self.tracker.started()  # not during the training steps: wandb's start would compete for the CPU
        result = None
        while not self._finished():
            epoch_start = time.perf_counter()
            train_loss, signum = self._train_epoch()
            p.epoch += 1
            p.batch = 0
            result = self._evaluate()
            log.info(
                "epoch %d/%d: train loss %.4f, %s accuracy %.2f%%, %s loss %.4f (step %d, %.1f s training)",
                p.epoch,
                cfg.epochs,
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
                    "epoch": p.epoch,
                    "train/epoch_loss": train_loss,
                    f"{split}/accuracy": result.accuracy,
                    f"{split}/loss": result.loss,
                    "epoch_seconds": time.perf_counter() - epoch_start,
                },
            )
            last = self._finished()
            if signum is not None and not last:
                raise self._stopped(signum)
            if signum is not None:
                log.info("%s at the last step: finishing the run normally", signal.Signals(signum).name)
            if (
                last
                or self._checkpoint_due()
                or (cfg.checkpoint_every_epochs and p.epoch % cfg.checkpoint_every_epochs == 0)
            ):
                self.save_checkpoint()
        if result is None:  # resumed from the checkpoint at the end of training
            result = self._evaluate()

        metrics = {
            **{key.replace("test_", f"{split}_", 1): value for key, value in result.metrics().items()},
            "eval_split": split,
            "world_size": self.world,
            "train_seconds": p.train_seconds,
            "eval_seconds": self.eval_seconds,  # the last evaluation of the whole evaluation set
            "epochs": p.epoch,
            "steps": p.step,
            "global_batch_size": self.global_batch,
            "per_process_batch_size": self.per_process,
            "lr": self.lr,
            "device": self.accelerator.device.type,
        }
        examples = misclassified_examples(result.predictions, self.test_set.images, self.test_set.labels)
        self.tracker.finish(metrics, result.confusion, examples)
        trained = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return self.recipe.inference_model(trained, self.accelerator), metrics, result


def run(cfg: Config) -> dict[str, Any]:
    """The whole job: check the run directory, train (or resume), write config, metrics and weights."""
    per_process_batch_size(cfg, world_size_from_env())  # fail before any process group work
    run_dir = runs.prepare_run_dir(cfg.output_dir)
    accelerator = build_accelerator(cfg, log_with=accelerator_log_with(cfg.tracker))
    setup_logging(accelerator.is_main_process)
    resume_from = checkpoint.resolve_on_main(accelerator, cfg, run_dir)  # before anything in run_dir is written
    resumed = None
    if resume_from is not None:
        resumed = checkpoint.read_state(resume_from)
        note = checkpoint.check_compatible(resumed, cfg, accelerator.num_processes, resume_from)
        if note:
            log.info(note)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / runs.CONFIG_FILE)
    tracker = Tracker(cfg, accelerator, run_dir)
    tracker.start(run_config(cfg, accelerator), resumed, resume_from)
    stop = StopFlags()
    try:
        trainer = Trainer(cfg, accelerator, tracker, run_dir, stop)
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
    if accelerator.is_main_process:
        digest = runs.save_weights(model.state_dict(), run_dir / runs.WEIGHTS_FILE)
        runs.write_json(run_dir / runs.METRICS_FILE, {**metrics, "weights_sha256": digest})
    split = metrics["eval_split"]
    accelerator.print(
        f"{split} accuracy: {100 * metrics[f'{split}_accuracy']:.2f}% "
        f"({metrics[f'{split}_correct']}/{metrics[f'{split}_total']}); run directory: {run_dir}"
    )
    accelerator.wait_for_everyone()
    tracker.end()  # on every rank: closes wandb (main process), ends the process group
    return metrics


if __name__ == "__main__":
    from .cli import run_as_process, train_command

    run_as_process(train_command, prog_name="python -m mnist_dist.train")
