"""Training: the same loop on 1 or N processes, CPU or GPU, launched by Accelerate.

Run it with ``accelerate launch [options] -m mnist_dist.train [options]``,
``python -m mnist_dist.train`` or ``mnist-dist train``. In ``batch_mode: global`` every
process takes ``batch_size / world_size`` samples of each global batch and gradients
are averaged, so N processes follow the mathematics of one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import runs
from .config import Config, effective_lr, global_batch_size, per_process_batch_size, save_config
from .evaluate import EvalResult, evaluate
from .loaders import make_loader, shard_sampler
from .model import MLP
from .progress import ProgressDisplay
from .recipe import Recipe, hold_out
from .runtime import build_accelerator, load_datasets, setup_logging, world_size_from_env
from .schedule import total_steps
from .tracking import Tracker, accelerator_log_with, misclassified_examples, run_config

log = logging.getLogger("mnist_dist")


@dataclass
class Progress:
    """Where training is: optimizer steps done, epochs done, time spent in training steps."""

    step: int = 0
    epoch: int = 0
    train_seconds: float = 0.0


def build_optimizer(model: torch.nn.Module, cfg: Config, world_size: int) -> torch.optim.SGD:
    return torch.optim.SGD(
        model.parameters(),
        lr=effective_lr(cfg, world_size),
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def optimizer_calls(optimizer, accelerator):
    """The ``(zero_grad, step)`` functions of the training loop.

    Accelerate 1.15's ``AcceleratedOptimizer.step`` looks up an optional package through
    importlib twice per call (``is_lomo_available``) and ``zero_grad`` inspects a signature
    per call: about 0.3 ms per step on a 2-core CPU, a third of this model's whole step.
    When the wrapper has nothing to add (no fp16 grad scaler, no XLA, no gradient
    accumulation) its calls are exactly the wrapped optimizer's, so use those directly.
    """
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", None)
    if (
        inner is None
        or getattr(optimizer, "scaler", None) is not None
        or accelerator.distributed_type == DistributedType.XLA
        or accelerator.gradient_accumulation_steps != 1
    ):
        return (lambda: optimizer.zero_grad(set_to_none=True)), optimizer.step
    return (lambda: inner.zero_grad(set_to_none=True)), inner.step


class NonFiniteError(RuntimeError):
    """Training diverged: the gradients of a step are NaN or infinite."""


def check_gradients(model: torch.nn.Module, cfg: Config, progress: Progress) -> None:
    """Clip the gradients if asked; refuse non-finite ones before the optimizer step.

    The gradients are already averaged over ranks (DDP's all-reduce), and one rank's NaN
    makes the average NaN everywhere: every rank reaches the same verdict at the same
    step, with no extra collective.
    """
    if not (cfg.check_finite or cfg.grad_clip):
        return
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if cfg.check_finite and not bool(torch.isfinite(norm)):
        raise NonFiniteError(
            f"the loss is not finite at step {progress.step + 1} (epoch {progress.epoch + 1}): gradient norm "
            f"{float(norm)}; training stopped before that step changed the weights. Lower the learning "
            f"rate (lr is {cfg.lr}) or clip gradients, e.g. --grad-clip 1.0"
        )
    if cfg.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm, foreach=True)


def train_one_epoch(model, optimizer, loader, accelerator, cfg: Config, progress: Progress,
                    display: ProgressDisplay, tracker: Tracker, recipe: Recipe) -> tuple[bool, float]:
    """Run one epoch (or up to ``max_steps``).

    Returns whether ``max_steps`` was reached, and the epoch's mean training loss over all ranks.
    """
    model.train()
    device = accelerator.device
    zero_grad, step = optimizer_calls(optimizer, accelerator)
    shard_sampler(loader).set_epoch(progress.epoch)
    interval_loss, epoch_loss = torch.zeros((), device=device), torch.zeros((), device=device)
    interval_steps = epoch_steps = 0
    reached_max = False
    start = time.perf_counter()
    recipe.start_epoch(progress.epoch)
    for images, labels, indices in loader:
        loss = F.cross_entropy(model(recipe.inputs(images, indices)), labels, label_smoothing=cfg.label_smoothing)
        zero_grad()
        accelerator.backward(loss)
        check_gradients(model, cfg, progress)
        step()
        recipe.after_step()
        progress.step += 1
        display.advance()
        # Accumulate on the device: no host synchronisation until a log interval.
        interval_loss += loss.detach()
        interval_steps += 1
        if progress.step % cfg.log_every == 0:
            mean = accelerator.reduce(interval_loss / interval_steps, reduction="mean").item()
            rate = display.interval(progress.step, mean, interval_steps)
            tracker.log_step(progress.step, {"train/loss": mean, "lr": optimizer.param_groups[0]["lr"],
                                             "train/samples_per_second": rate})
            epoch_loss += interval_loss
            epoch_steps += interval_steps
            interval_loss.zero_()
            interval_steps = 0
        if cfg.max_steps is not None and progress.step >= cfg.max_steps:
            reached_max = True
            break
    progress.train_seconds += time.perf_counter() - start
    epoch_loss += interval_loss
    epoch_steps += interval_steps
    mean_loss = accelerator.reduce(epoch_loss / max(epoch_steps, 1), reduction="mean").item()
    return reached_max, mean_loss


def train(cfg: Config, accelerator, tracker: Tracker) -> tuple[torch.nn.Module, dict[str, Any], EvalResult]:
    """Train and evaluate after every epoch; return the unwrapped model, metrics, last evaluation."""
    from accelerate.utils import set_seed

    world = accelerator.num_processes
    per_process = per_process_batch_size(cfg, world)
    global_batch, lr = global_batch_size(cfg, world), effective_lr(cfg, world)
    train_set, test_set = load_datasets(cfg, accelerator)
    train_set, test_set, split = hold_out(train_set, test_set, cfg.val_size)  # split: "test" or "val"

    set_seed(cfg.seed)  # same initial weights on every rank
    model = MLP(cfg.hidden_sizes)
    sgd = build_optimizer(model, cfg, world)
    # Only model and optimizer go through prepare: the loaders are sharded already.
    model, optimizer = accelerator.prepare(model, sgd)
    shard = dict(num_replicas=world, rank=accelerator.process_index, seed=cfg.seed)
    train_loader = make_loader(train_set, per_process, shuffle=cfg.shuffle, **shard)
    test_loader = make_loader(test_set, cfg.eval_batch_size, shuffle=False, **shard)
    steps = total_steps(cfg.epochs, len(train_loader), cfg.max_steps)  # the same on every rank
    recipe = Recipe(cfg, sgd, train_set, steps, accelerator.device)

    log.info(
        "training %s on %d process(es) (%s): global batch %d (%d per process), lr %g, %d epochs",
        cfg.dataset, world, accelerator.device.type, global_batch, per_process, lr, cfg.epochs,
    )
    progress = Progress()
    display = ProgressDisplay(accelerator.is_main_process, global_batch)
    result = None
    while progress.epoch < cfg.epochs:
        left = len(train_loader) if cfg.max_steps is None else cfg.max_steps - progress.step
        display.start_epoch(progress.epoch + 1, cfg.epochs, min(len(train_loader), left))
        epoch_start = time.perf_counter()
        done, train_loss = train_one_epoch(model, optimizer, train_loader, accelerator, cfg, progress,
                                           display, tracker, recipe)
        display.end_epoch()
        progress.epoch += 1
        result = evaluate(recipe.inference_model(model, accelerator), test_loader, accelerator)
        log.info("epoch %d/%d: train loss %.4f, %s accuracy %.2f%%, %s loss %.4f (step %d, %.1f s training)",
                 progress.epoch, cfg.epochs, train_loss, split, 100 * result.accuracy, split, result.loss,
                 progress.step, progress.train_seconds)
        tracker.log_epoch(progress.step, {
            "epoch": progress.epoch, "train/epoch_loss": train_loss, f"{split}/accuracy": result.accuracy,
            f"{split}/loss": result.loss, "epoch_seconds": time.perf_counter() - epoch_start,
        })
        if done:
            break

    metrics = {
        **{key.replace("test_", f"{split}_", 1): value for key, value in result.metrics().items()},
        "eval_split": split,
        "world_size": world,
        "train_seconds": progress.train_seconds,
        "epochs": progress.epoch,
        "steps": progress.step,
        "global_batch_size": global_batch,
        "per_process_batch_size": per_process,
        "lr": lr,
        "device": accelerator.device.type,
    }
    examples = misclassified_examples(result.predictions, test_set.images, test_set.labels)
    tracker.finish(metrics, result.confusion, examples)
    trained = accelerator.unwrap_model(model, keep_torch_compile=False)
    return recipe.inference_model(trained, accelerator), metrics, result


def run(cfg: Config) -> dict[str, Any]:
    """The whole job: check the run directory, train, write config, metrics and weights."""
    per_process_batch_size(cfg, world_size_from_env())  # fail before any process group work
    run_dir = runs.prepare_run_dir(cfg.output_dir)
    accelerator = build_accelerator(cfg, log_with=accelerator_log_with(cfg.tracker))
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / runs.CONFIG_FILE)
    tracker = Tracker(cfg, accelerator, run_dir)
    tracker.start(run_config(cfg, accelerator))
    model, metrics, _ = train(cfg, accelerator, tracker)
    if accelerator.is_main_process:
        runs.save_weights(model.state_dict(), run_dir / runs.WEIGHTS_FILE)
        runs.write_json(run_dir / runs.METRICS_FILE, metrics)
    split = metrics["eval_split"]
    accelerator.print(
        f"{split} accuracy: {100 * metrics[f'{split}_accuracy']:.2f}% "
        f"({metrics[f'{split}_correct']}/{metrics[f'{split}_total']}); run directory: {run_dir}"
    )
    accelerator.wait_for_everyone()
    tracker.end()  # on every rank: closes wandb (main process), ends the process group
    return metrics


if __name__ == "__main__":
    from .cli import train_command

    train_command(prog_name="python -m mnist_dist.train")
