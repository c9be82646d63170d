"""The grid of misclassified digits."""

import numpy as np
import torch

from mnist_dist.tracking.pictures import misclassified_grid


def test_grid_shows_each_digit_and_its_labels(mnist_test):
    images, labels = mnist_test
    grid = misclassified_grid(images[:10], torch.full((10,), 3), labels[:10], columns=8, scale=3)
    assert grid.size == (8 * 96, 2 * 114)  # 8 columns of 84 px digits + padding, 2 rows with captions
    cell = torch.from_numpy(np.asarray(grid.crop((6, 6, 90, 90)).convert("L")).copy())
    expected = (255 - images[0]).repeat_interleave(3, 0).repeat_interleave(3, 1)  # dark ink on white
    assert torch.equal(cell, expected)
    caption = torch.from_numpy(np.asarray(grid.crop((6, 93, 90, 111)).convert("L")).copy())
    assert (caption < 128).sum() > 30  # text is drawn under the digit
