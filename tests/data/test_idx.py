"""Reading IDX files: every header field checked, the real files read whole."""

import pytest

from mnist_dist.data.idx import load_split, read_idx
from mnist_dist.data.sources import DATASETS, raw_dir
from mnist_dist.errors import DataError


def test_wrong_magic_number_and_count(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    assert read_idx(path, 2049, 3).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        read_idx(path, 2051, 3)
    with pytest.raises(DataError, match="holds 3 items, expected 4"):
        read_idx(path, 2049, 4)


def test_both_splits_of_mnist_read_as_uint8_images_and_labels(data_dir):
    raw = raw_dir(data_dir, DATASETS["mnist"])
    for split, count in (("train", 60000), ("test", 10000)):
        images, labels = load_split(raw, "mnist", split)
        assert images.shape == (count, 28, 28) and str(images.dtype) == "torch.uint8"
        assert labels.shape == (count,) and int(labels.min()) == 0 and int(labels.max()) == 9
