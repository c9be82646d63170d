from types import SimpleNamespace

import pytest
import torch

from mnist_dist.config import build_config
from mnist_dist.data.loaders import TensorImages, to_inputs
from mnist_dist.errors import ConfigError
from mnist_dist.model import MLP
from mnist_dist.training.recipe import Recipe, fold_standardisation, hold_out, pixel_stats

CPU = torch.device("cpu")


def _images(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
    return TensorImages(images, torch.randint(0, 10, (n,), generator=gen))


def _optimizer():
    return torch.optim.SGD(MLP((8,)).parameters(), lr=0.1)


def test_pixel_stats_are_exact():
    images = _images().images
    mean, std = pixel_stats(images)
    x = images.double() / 255
    assert mean == pytest.approx(float(x.mean()), abs=1e-12)
    assert std == pytest.approx(float(x.std(unbiased=False)), abs=1e-12)


def test_folded_weights_take_raw_pixels():
    torch.manual_seed(0)
    model = MLP()
    x = torch.rand(5, 28, 28)
    mean, std = 0.13, 0.31
    folded = MLP()
    folded.load_state_dict(fold_standardisation(model.state_dict(), mean, std))
    torch.testing.assert_close(folded(x), model((x - mean) / std), atol=1e-4, rtol=1e-5)
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_reference_recipe_adds_nothing():
    cfg = build_config()
    train_set = _images()
    recipe = Recipe(cfg, _optimizer(), train_set, total_steps=10, device=CPU)
    assert recipe.scheduler is None and recipe.augmenter is None and recipe.stats is None
    recipe.start_epoch(0)
    assert torch.equal(recipe.inputs(train_set.images[:4], torch.arange(4)), to_inputs(train_set.images[:4], CPU))
    model = MLP((8,))
    assert recipe.inference_model(model, accelerator=None) is model


def test_full_recipe_inputs_are_augmented_and_standardised():
    cfg = build_config(
        None,
        {
            "normalize": True,
            "augment_translate": 2.0,
            "augment_elastic": 1.0,
            "lr_schedule": "linear",
            "warmup_fraction": 0.5,
        },
    )
    train_set = _images()
    opt = _optimizer()
    recipe = Recipe(cfg, opt, train_set, total_steps=4, device=CPU)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)  # warm-up over 2 of 4 steps
    opt.step()
    recipe.after_step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 / 3)
    recipe.start_epoch(0)
    x = recipe.inputs(train_set.images[:8], torch.arange(8))
    plain = (to_inputs(train_set.images[:8], CPU) - recipe.stats[0]) / recipe.stats[1]
    assert x.shape == (8, 28, 28) and not torch.allclose(x, plain)
    accelerator = SimpleNamespace(unwrap_model=lambda m, keep_torch_compile=False: m)
    model = MLP((8,))
    folded = recipe.inference_model(model, accelerator)
    raw = to_inputs(train_set.images[:8], CPU)
    torch.testing.assert_close(folded(raw), model((raw - recipe.stats[0]) / recipe.stats[1]), atol=1e-4, rtol=1e-5)


def test_hold_out_keeps_the_last_images_for_validation():
    train_set, test_set = _images(100), _images(10, seed=1)
    assert hold_out(train_set, test_set, 0) == (train_set, test_set, "test")
    train, val, split = hold_out(train_set, test_set, 30)
    assert (len(train), len(val), split) == (70, 30, "val")
    assert torch.equal(val.images, train_set.images[70:]) and torch.equal(train.labels, train_set.labels[:70])
    with pytest.raises(ConfigError, match="'val_size' \\(100\\) must be smaller than the training set"):
        hold_out(train_set, test_set, 100)
