"""Pictures of MNIST digits for the inference tests: drawn on paper, and compared with what the model sees."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mnist_dist.inference.preprocess import preprocess


def mnist_digits(mnist_test) -> list[np.ndarray]:
    """A few MNIST test digits as uint8 arrays (28, 28), white on black."""
    images, _ = mnist_test
    return [images[i].numpy() for i in range(12)]


def on_paper(digit: np.ndarray, scale: float = 4, margins=(30, 90, 60, 10), ink=(0, 0, 0), paper=(255, 255, 255)):
    """``digit`` drawn in ``ink`` on ``paper`` (RGB uint8), enlarged, with ``margins`` (top, bottom, left, right)."""
    side = round(28 * scale)
    amount = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    top, bottom, left, right = margins
    amount = np.pad(amount, ((top, bottom), (left, right)))[..., None]
    rgb = np.array(paper, float) * (1 - amount) + np.array(ink, float) * amount
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity, best over shifts of one pixel (rounding the centre of mass may differ by one)."""
    return max(
        float(torch.nn.functional.cosine_similarity(torch.roll(a, (dy, dx), (0, 1)).flatten(), b.flatten(), dim=0))
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )


def reference(digit: np.ndarray) -> torch.Tensor:
    """What the model sees for an MNIST digit itself: the picture every drawing of it is compared with."""
    return preprocess(digit)
