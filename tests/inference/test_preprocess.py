"""preprocess: pictures of a digit (ink on paper, faint, noisy, tiny, huge, transparent) become MNIST-like input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from pictures import mnist_digits, on_paper, reference, similarity
from PIL import Image

from mnist_dist.inference.preprocess import BlankImageError, preprocess


@pytest.fixture(scope="module")
def digits(mnist_test):
    return mnist_digits(mnist_test)


def test_output_is_a_28x28_float_image_in_unit_range(digits):
    out = preprocess(on_paper(digits[0]))
    assert out.shape == (28, 28) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) == pytest.approx(1.0, abs=0.05)


def test_digit_fits_20x20_box_with_centre_of_mass_at_14(digits):
    for digit in digits[:5]:
        out = preprocess(on_paper(digit, scale=5.3)).numpy()
        rows, cols = np.nonzero(out > 0.25)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 in (19, 20, 21)
        r, c = np.indices(out.shape)
        assert (r * out).sum() / out.sum() == pytest.approx(14, abs=0.6)
        assert (c * out).sum() / out.sum() == pytest.approx(14, abs=0.6)


def test_aspect_ratio_is_kept():
    bar = np.full((300, 60), 255, np.uint8)
    bar[20:280, 25:35] = 0  # a tall thin stroke, like a "1"
    out = preprocess(bar).numpy()
    rows, cols = np.nonzero(out > 0.25)
    assert np.ptp(rows) + 1 == 20 and np.ptp(cols) + 1 <= 3


def test_mnist_images_themselves_pass_through_nearly_unchanged(mnist_test):
    images, _ = mnist_test
    diffs = [float((preprocess(images[i]) - images[i].float() / 255).abs().mean()) for i in range(100)]
    assert np.median(diffs) < 0.005


def test_transparent_background_counts_as_background(digits, tmp_path):
    digit = digits[2]
    amount = np.asarray(Image.fromarray(digit).resize((112, 112), Image.Resampling.BICUBIC))
    # Black ink whose only shape is in the alpha channel; the colour of transparent pixels is
    # irrelevant, so make it white in one file and black in the other.
    for colour in (0, 255):
        rgba = np.zeros((112, 112, 4), np.uint8)
        rgba[..., :3] = colour
        rgba[amount > 0, :3] = 0
        rgba[..., 3] = amount
        path = tmp_path / f"t{colour}.png"
        Image.fromarray(rgba, "RGBA").save(path)
        assert similarity(preprocess(path), reference(digit)) > 0.95


def test_light_ink_on_dark_background_is_not_inverted(digits):
    digit = digits[5]
    assert similarity(preprocess(on_paper(digit, ink=(250, 250, 200), paper=(20, 20, 40))), reference(digit)) > 0.95


def test_faint_pencil_reaches_full_strength(digits):
    out = preprocess(on_paper(digits[6], ink=(170, 170, 170), paper=(235, 235, 235)))
    assert float(out.max()) == pytest.approx(1.0, abs=0.05)
    assert similarity(out, reference(digits[6])) > 0.95


def test_noise_and_a_speck_of_dust_are_ignored(digits):
    digit = digits[7]
    page = on_paper(digit, margins=(60, 60, 60, 200)).astype(np.float64)
    page += np.random.default_rng(0).normal(0, 6, page.shape)
    page[150:154, 400:404] = 0  # dust, far right of the digit
    out = preprocess(np.clip(page, 0, 255).astype(np.uint8))
    assert similarity(out, reference(digit)) > 0.95


def test_tiny_and_huge_images(digits):
    digit = digits[8]
    assert similarity(preprocess(on_paper(digit, scale=0.6, margins=(5, 5, 5, 5))), reference(digit)) > 0.95
    start = time.perf_counter()
    huge = preprocess(on_paper(digit, scale=50, margins=(100, 500, 600, 50)))  # reduced before use
    assert time.perf_counter() - start < 5
    assert similarity(huge, reference(digit)) > 0.95


@pytest.mark.parametrize(
    "image",
    [
        np.full((100, 80), 255, np.uint8),
        np.full((50, 50, 3), (10, 120, 200), np.uint8),
        np.clip(np.random.default_rng(0).normal(200, 8, (120, 120)), 0, 255).astype(np.uint8),
        Image.new("RGBA", (60, 60), (0, 0, 0, 0)),
    ],
    ids=["white", "one-colour", "noise-only", "fully-transparent"],
)
def test_blank_images_are_reported_not_guessed(image):
    with pytest.raises(BlankImageError, match="no ink found"):
        preprocess(image)
