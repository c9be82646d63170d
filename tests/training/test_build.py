"""The objects a run trains with, built from the config on one process."""

import pytest
import torch

from mnist_dist.config import build_config
from mnist_dist.data.idx import load_split
from mnist_dist.data.sources import DATASETS, raw_dir
from mnist_dist.training.build import build


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def initial_weights(parts) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in parts.model.state_dict().items()}


def test_the_reference_recipe(accelerator, data_dir):
    parts = build(build_config(None, {"cpu": True, "data_dir": str(data_dir)}), accelerator)
    assert (parts.per_process, parts.global_batch, parts.lr, parts.split) == (64, 64, 0.5, "test")
    assert (len(parts.train_loader), parts.total_steps) == (938, 9380)  # 60,000 / 64 rounded up, 10 epochs
    assert (len(parts.train_set), len(parts.eval_set)) == (60000, 10000)
    assert parts.recipe.scheduler is None and parts.recipe.augmenter is None
    assert parts.optimizer.param_groups[0]["momentum"] == 0.0


def test_a_validation_hold_out_and_a_step_limit(accelerator, data_dir):
    cfg = build_config(
        None,
        {
            "cpu": True,
            "data_dir": str(data_dir),
            "val_size": 10000,
            "max_steps": 100,
            "lr_schedule": "cosine",
            "momentum": 0.9,
        },
    )
    parts = build(cfg, accelerator)
    assert (len(parts.train_set), len(parts.eval_set), parts.split) == (50000, 10000, "val")
    assert parts.total_steps == 100 and parts.recipe.scheduler is not None
    images, _ = load_split(raw_dir(data_dir, DATASETS["mnist"]), "mnist", "train")
    # The last 10,000 training images are evaluated, never trained on.
    assert torch.equal(parts.eval_set.images, images[-10000:]) and torch.equal(parts.train_set.images, images[:-10000])


def test_the_seed_alone_decides_the_initial_weights(accelerator, data_dir):
    cfg = {"cpu": True, "data_dir": str(data_dir)}
    first = initial_weights(build(build_config(None, cfg), accelerator))
    again = initial_weights(build(build_config(None, cfg), accelerator))
    other = initial_weights(build(build_config(None, {**cfg, "seed": 1}), accelerator))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in first)
