"""Everything a run trains with, built from the config and handed to the trainer.

The order is fixed, since the seed makes it matter: data, then the model's initial
weights (the same seed on every rank), the optimizer, ``accelerator.prepare``, the
sharded loaders, the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ..config import Config, effective_lr, global_batch_size, per_process_batch_size
from ..data.loaders import TensorImages, load_datasets, make_loader
from ..model import MLP
from .recipe import Recipe, hold_out
from .schedule import total_steps


@dataclass
class TrainingParts:
    """What the trainer is handed, already built and prepared."""

    model: torch.nn.Module  # prepared by Accelerate (wrapped for N processes)
    optimizer: torch.optim.Optimizer  # prepared by Accelerate
    train_loader: DataLoader  # this rank's shard of the training set
    eval_loader: DataLoader  # this rank's shard of the evaluation set
    train_set: TensorImages
    eval_set: TensorImages
    split: str  # what is evaluated: "test", or "val" (a hold-out of the training set)
    recipe: Recipe
    total_steps: int  # optimizer steps of the whole run
    per_process: int  # samples each process takes per step
    global_batch: int  # samples per optimizer step over all processes
    lr: float  # the base learning rate after any scaling


def build_optimizer(model: torch.nn.Module, cfg: Config, world_size: int) -> torch.optim.SGD:
    """SGD with the config's learning rate (scaled for the world size if asked), momentum and decay."""
    return torch.optim.SGD(
        model.parameters(),
        lr=effective_lr(cfg, world_size),
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def build(cfg: Config, accelerator) -> TrainingParts:
    """Load the data onto the device, make the model and optimizer, prepare them, shard the loaders."""
    return assemble(cfg, accelerator, *hold_out(*load_datasets(cfg, accelerator), cfg.val_size))


def assemble(cfg: Config, accelerator, train_set: TensorImages, eval_set: TensorImages, split: str) -> TrainingParts:
    """The parts of a run over datasets already on the device (``split``: what ``eval_set`` is)."""
    from accelerate.utils import set_seed

    world = accelerator.num_processes
    set_seed(cfg.seed)  # same initial weights on every rank
    model = MLP(cfg.hidden_sizes)
    sgd = build_optimizer(model, cfg, world)
    # Only model and optimizer go through prepare: the loaders are sharded already.
    prepared_model, optimizer = accelerator.prepare(model, sgd)
    per_process = per_process_batch_size(cfg, world)
    shard = dict(num_replicas=world, rank=accelerator.process_index, seed=cfg.seed)
    train_loader = make_loader(train_set, per_process, shuffle=cfg.shuffle, **shard)
    eval_loader = make_loader(eval_set, cfg.eval_batch_size, shuffle=False, **shard)
    steps = total_steps(cfg.epochs, len(train_loader), cfg.max_steps)  # the same on every rank
    return TrainingParts(
        model=prepared_model,
        optimizer=optimizer,
        train_loader=train_loader,
        eval_loader=eval_loader,
        train_set=train_set,
        eval_set=eval_set,
        split=split,
        recipe=Recipe(cfg, sgd, train_set, steps, accelerator.device),
        total_steps=steps,
        per_process=per_process,
        global_batch=global_batch_size(cfg, world),
        lr=effective_lr(cfg, world),
    )
