"""The optional parts of a training recipe, put together from the config for the loop.

Inputs (uint8 -> [0, 1] -> augmentation -> standardisation), the per-step learning-rate
schedule, the model that is evaluated and saved, and the validation hold-out. With all of
them off (the reference recipe) the loop is what it always was: pixels in [0, 1], a
constant learning rate, the trained model evaluated on the test set as it is.
"""

from __future__ import annotations

import torch

from ..data.augment import Augmenter, AugmentSpec
from ..data.loaders import TensorImages, to_inputs
from ..errors import ConfigError
from ..model import MLP
from .schedule import build_scheduler


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of uint8 ``images`` scaled to [0, 1], exactly (a histogram)."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64, device=counts.device) / 255
    n = counts.sum()
    mean = (counts * values).sum() / n
    var = (counts * (values - mean) ** 2).sum() / n
    return float(mean), float(var.sqrt())


def fold_standardisation(state_dict: dict[str, torch.Tensor], mean: float, std: float) -> dict[str, torch.Tensor]:
    """Weights for [0, 1] pixels of an MLP trained on ``(x - mean) / std``.

    ``W (x - m) / s + b = (W / s) x + (b - (m / s) * W 1)``: only the first layer changes,
    so the saved model keeps its shapes and takes the same pixels as any other.
    """
    out = dict(state_dict)
    w, b = state_dict["layers.0.weight"], state_dict["layers.0.bias"]
    out["layers.0.weight"] = w / std
    out["layers.0.bias"] = b - (mean / std) * w.sum(dim=1)
    return out


class Recipe:
    """What the training loop does beyond forward, backward and optimizer step."""

    def __init__(
        self, cfg, optimizer: torch.optim.Optimizer, train_set: TensorImages, total_steps: int, device: torch.device
    ) -> None:
        self.device = device
        self.scheduler = None
        if cfg.lr_schedule != "constant" or cfg.warmup_fraction > 0:
            # The plain torch scheduler, not Accelerate's wrapper: see schedule.py.
            self.scheduler = build_scheduler(optimizer, cfg.lr_schedule, total_steps, cfg.warmup_fraction)
        spec = AugmentSpec.from_config(cfg)
        self.augmenter = Augmenter(spec, len(train_set), cfg.seed, device) if spec.enabled else None
        # Statistics of the images trained on (the validation hold-out excluded).
        self.stats = pixel_stats(train_set.images) if cfg.normalize else None

    def start_epoch(self, epoch: int) -> None:
        if self.augmenter is not None:
            self.augmenter.set_epoch(epoch)

    def inputs(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """A training batch as the model sees it; ``indices`` are the images' dataset indices."""
        x = to_inputs(images, self.device)
        if self.augmenter is not None:
            x = self.augmenter(x, indices)  # on [0, 1] pixels: the padding is background
        if self.stats is not None:
            x = x.sub_(self.stats[0]).div_(self.stats[1])
        return x

    def after_step(self) -> None:
        """Call after every optimizer step."""
        if self.scheduler is not None:
            self.scheduler.step()

    def inference_model(self, model: torch.nn.Module, accelerator) -> torch.nn.Module:
        """The model to evaluate and save: it takes [0, 1] pixels, as ``evaluate`` and ``predict`` give.

        ``model`` itself when there is nothing to fold in; else a plain ``MLP`` on the same
        device holding the trained weights with the standardisation folded into the first layer.
        """
        if self.stats is None:
            return model
        trained = accelerator.unwrap_model(model, keep_torch_compile=False)
        state = fold_standardisation({k: v.detach() for k, v in trained.state_dict().items()}, *self.stats)
        folded = MLP(trained.hidden_sizes).to(self.device)
        folded.load_state_dict(state)
        return folded.eval()


def hold_out(train_set: TensorImages, test_set: TensorImages, val_size: int) -> tuple[TensorImages, TensorImages, str]:
    """``(train, evaluation set, its name)``: the test set, or with ``val_size`` the last
    ``val_size`` training images ("val"), kept out of training for choosing hyper-parameters."""
    if not val_size:
        return train_set, test_set, "test"
    n = len(train_set)
    if val_size >= n:
        raise ConfigError(f"config key 'val_size' ({val_size}) must be smaller than the training set ({n} images)")
    return (
        TensorImages(train_set.images[:-val_size], train_set.labels[:-val_size]),
        TensorImages(train_set.images[-val_size:], train_set.labels[-val_size:]),
        "val",
    )
