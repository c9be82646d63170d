"""Regenerate the pictures of docs/predict.md: a photo-like input image and what the model sees.

    python scripts/make_predict_figure.py [--data-dir data] [--index 0] [--out-dir docs]

The input is made from an MNIST test digit the way a user's picture looks: dark blue ink
on cream paper, enlarged, off-centre, with some grain. ``predict_seen.png`` is the 28x28
output of :func:`mnist_dist.inference.preprocess.preprocess` on that file, enlarged 8x without smoothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_dist.data.idx import load_split
from mnist_dist.data.sources import DATASETS, ensure_dataset, raw_dir
from mnist_dist.inference.preprocess import preprocess

INK, PAPER = np.array([30.0, 40.0, 110.0]), np.array([246.0, 241.0, 228.0])
CANVAS = (300, 220)  # width, height of the input picture
SCALE = 6  # enlargement of the 28x28 digit
OFFSET = (40, 120)  # top, left of the enlarged digit: deliberately off-centre
SHOW = 8  # enlargement of the 28x28 model input in the second picture


def make_input(digit: np.ndarray, seed: int = 0) -> Image.Image:
    """A paper-and-pen version of one MNIST digit (uint8 ``(28, 28)``, white on black)."""
    side = 28 * SCALE
    big = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    width, height = CANVAS
    amount = np.zeros((height, width))
    top, left = OFFSET
    amount[top : top + side, left : left + side] = big[: height - top, : width - left]
    shade = np.linspace(1.0, 0.94, width)[None, :, None]  # uneven light across the page
    rgb = (PAPER * shade) * (1 - amount[..., None]) + INK * amount[..., None]
    rgb += np.random.default_rng(seed).normal(0.0, 3.0, rgb.shape)  # paper grain and sensor noise
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "data"))
    parser.add_argument("--index", type=int, default=0, help="which MNIST test image to draw")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args()

    ensure_dataset(args.data_dir, "mnist")
    images, _ = load_split(raw_dir(args.data_dir, DATASETS["mnist"]), "mnist", "test")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    input_path = args.out_dir / "predict_input.png"
    make_input(images[args.index].numpy()).save(input_path, optimize=True)
    seen = (preprocess(input_path).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(seen).resize((28 * SHOW, 28 * SHOW), Image.Resampling.NEAREST).save(
        args.out_dir / "predict_seen.png", optimize=True
    )


if __name__ == "__main__":
    main()
