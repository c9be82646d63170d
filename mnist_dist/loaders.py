"""DistributedSampler-backed data loaders over in-memory uint8 tensors.

These loaders are already sharded (each process reads its own ``DistributedSampler``
shard), so they must NOT go through ``accelerator.prepare``: Accelerate would shard them
a second time and silently drop data. Each batch is gathered with one indexing
operation (``__getitems__``), not sample by sample.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images uint8, labels, dataset indices


class TensorImages(Dataset):
    """Images (uint8) and labels held in memory, on any device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, indices) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        idx_here = idx.to(self.images.device, non_blocking=True)
        return self.images[idx_here], self.labels[idx_here], idx


class ShardBatches(Sampler):
    """Batches of a ``DistributedSampler``'s shard, as index tensors.

    Same batches as ``BatchSampler(sampler, batch_size, drop_last=False)``, but the
    epoch's order is turned into one tensor and sliced, instead of building a Python
    list per batch: the loader then costs a few microseconds per step.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.skip = 0

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def skip_next(self, batches: int) -> None:
        """Start the next pass ``batches`` batches in (a run resumed mid-epoch); later passes start at 0."""
        self.skip = batches

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        skip, self.skip = self.skip, 0
        return iter(order.split(self.batch_size)[skip:])


def _whole_batch(batch: Batch) -> Batch:
    return batch


def make_loader(
    dataset: TensorImages,
    batch_size: int,
    *,
    num_replicas: int,
    rank: int,
    shuffle: bool,
    seed: int,
) -> DataLoader:
    """One process's loader: its ``DistributedSampler`` shard in batches of ``batch_size``.

    Call ``shard_sampler(loader).set_epoch(epoch)`` before every epoch (the shuffle depends on it).
    When ``num_replicas`` does not divide the dataset, the sampler pads with repeated
    samples so every rank has as many; ``evaluate`` removes that padding.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    return DataLoader(dataset, batch_sampler=ShardBatches(sampler, batch_size), collate_fn=_whole_batch)


def to_inputs(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] on ``device`` (converted after the copy: 4x less traffic)."""
    return torch.div(images.to(device, non_blocking=True), 255.0)  # one kernel: uint8 / float -> float32


def shard_sampler(loader: DataLoader) -> DistributedSampler:
    """The ``DistributedSampler`` behind a ``make_loader`` loader (for ``set_epoch``, rank, padding)."""
    return loader.batch_sampler.sampler
