"""Read IDX files (the MNIST format) into tensors, checking every header field."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from .sources import DATASETS, find_file, read_bytes

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def read_idx(path: Path, expected_magic: int, expected_count: int) -> torch.Tensor:
    """Read one IDX file into a uint8 tensor, checking magic number, shape and length."""
    data = read_bytes(path)
    if len(data) < 8:
        raise DataError(f"{path} is too short to be an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path} has magic number {magic}, expected {expected_magic}")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    if dims[0] != expected_count:
        raise DataError(f"{path} holds {dims[0]} items, expected {expected_count}")
    n = 1
    for d in dims:
        n *= d
    if len(data) - header != n:
        raise DataError(f"{path} has {len(data) - header} data bytes, its header says {n}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def load_split(raw: Path, dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` of ``split`` ('train' or 'test')."""
    spec = DATASETS[dataset]
    image_file, label_file = spec.train if split == "train" else spec.test
    paths = [find_file(raw, f) for f in (image_file, label_file)]
    for p, f in zip(paths, (image_file, label_file)):
        if p is None:
            raise DataError(f"{raw / f.name} is missing; fetch it with: mnist-dist data download --dataset {dataset}")
    images = read_idx(paths[0], IMAGES_MAGIC, image_file.count)
    labels = read_idx(paths[1], LABELS_MAGIC, label_file.count).long()
    if images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]} holds images of shape {tuple(images.shape[1:])}, expected (28, 28)")
    if labels.numel() and int(labels.max()) > 9:
        raise DataError(f"{paths[1]} holds label {int(labels.max())}, expected 0-9")
    return images, labels
