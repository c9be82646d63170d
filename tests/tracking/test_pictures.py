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


def test_table_rows_carry_the_top_three_classes():
    from mnist_dist.tracking.pictures import TABLE_COLUMNS, misclassified_rows, top_classes

    probabilities = torch.tensor([[0.05, 0.0, 0.0, 0.81, 0.0, 0.12, 0.0, 0.0, 0.02, 0.0]])
    assert top_classes(probabilities[0]) == "3: 81.0%, 5: 12.0%, 0: 5.0%"
    examples = {
        "images": torch.arange(28 * 28, dtype=torch.uint8).reshape(1, 28, 28),
        "predicted": torch.tensor([3]),
        "label": torch.tensor([5]),
        "index": torch.tensor([1234]),
    }
    (row,) = misclassified_rows({**examples, "probabilities": probabilities})
    assert TABLE_COLUMNS == ("image", "label", "prediction", "top probabilities", "index")
    assert row[0].shape == (28, 28) and row[0].dtype == np.uint8 and (row[0] == examples["images"][0].numpy()).all()
    assert row[1:] == [5, 3, "3: 81.0%, 5: 12.0%, 0: 5.0%", 1234]
    assert misclassified_rows(examples)[0][3] == ""  # examples without probabilities
