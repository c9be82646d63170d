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
from .loaders import make_loader, to_inputs
from .model import MLP
from .runtime import build_accelerator, load_datasets, setup_logging, world_size_from_env

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


def train_one_epoch(model, optimizer, loader, accelerator, cfg: Config, progress: Progress) -> tuple[bool, float]:
    """Run one epoch (or up to ``max_steps``).

    Returns whether ``max_steps`` was reached, and the epoch's mean training loss over all ranks.
    """
    model.train()
    device = accelerator.device
    loader.sampler.set_epoch(progress.epoch)
    interval_loss, epoch_loss = torch.zeros((), device=device), torch.zeros((), device=device)
    interval_steps = epoch_steps = 0
    reached_max = False
    start = time.perf_counter()
    for images, labels, _ in loader:
        loss = F.cross_entropy(model(to_inputs(images, device)), labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        progress.step += 1
        # Accumulate on the device: no host synchronisation until a log interval.
        interval_loss += loss.detach()
        interval_steps += 1
        if progress.step % cfg.log_every == 0:
            mean = accelerator.reduce(interval_loss / interval_steps, reduction="mean").item()
            log.debug("epoch %d step %d loss %.4f", progress.epoch + 1, progress.step, mean)
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


def train(cfg: Config, accelerator) -> tuple[torch.nn.Module, dict[str, Any], EvalResult]:
    """Train and evaluate after every epoch; return the unwrapped model, metrics, last evaluation."""
    from accelerate.utils import set_seed

    world = accelerator.num_processes
    per_process = per_process_batch_size(cfg, world)
    train_set, test_set = load_datasets(cfg, accelerator)

    set_seed(cfg.seed)  # same initial weights on every rank
    model = MLP(cfg.hidden_sizes)
    optimizer = build_optimizer(model, cfg, world)
    # Only model and optimizer go through prepare: the loaders are sharded already.
    model, optimizer = accelerator.prepare(model, optimizer)
    shard = dict(num_replicas=world, rank=accelerator.process_index, seed=cfg.seed)
    train_loader = make_loader(train_set, per_process, shuffle=cfg.shuffle, **shard)
    test_loader = make_loader(test_set, cfg.eval_batch_size, shuffle=False, **shard)

    log.info(
        "training %s on %d process(es) (%s): global batch %d (%d per process), lr %g, %d epochs",
        cfg.dataset, world, accelerator.device.type, global_batch_size(cfg, world), per_process,
        effective_lr(cfg, world), cfg.epochs,
    )
    progress = Progress()
    result = None
    while progress.epoch < cfg.epochs:
        done, train_loss = train_one_epoch(model, optimizer, train_loader, accelerator, cfg, progress)
        progress.epoch += 1
        result = evaluate(model, test_loader, accelerator)
        log.info("epoch %d/%d: train loss %.4f, test accuracy %.2f%%, test loss %.4f (step %d, %.1f s training)",
                 progress.epoch, cfg.epochs, train_loss, 100 * result.accuracy, result.loss,
                 progress.step, progress.train_seconds)
        if done:
            break

    metrics = {
        **result.metrics(),
        "world_size": world,
        "train_seconds": progress.train_seconds,
        "epochs": progress.epoch,
        "steps": progress.step,
        "global_batch_size": global_batch_size(cfg, world),
        "per_process_batch_size": per_process,
        "lr": effective_lr(cfg, world),
        "device": accelerator.device.type,
    }
    return accelerator.unwrap_model(model), metrics, result


def run(cfg: Config) -> dict[str, Any]:
    """The whole job: check the run directory, train, write config, metrics and weights."""
    per_process_batch_size(cfg, world_size_from_env())  # fail before any process group work
    run_dir = runs.prepare_run_dir(cfg.output_dir)
    accelerator = build_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / runs.CONFIG_FILE)
    model, metrics, _ = train(cfg, accelerator)
    if accelerator.is_main_process:
        runs.save_weights(model.state_dict(), run_dir / runs.WEIGHTS_FILE)
        runs.write_json(run_dir / runs.METRICS_FILE, metrics)
    accelerator.print(
        f"test accuracy: {100 * metrics['test_accuracy']:.2f}% "
        f"({metrics['test_correct']}/{metrics['test_total']}); run directory: {run_dir}"
    )
    accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    from .cli import train_command

    train_command(prog_name="python -m mnist_dist.train")
