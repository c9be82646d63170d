"""DistributedSampler-backed data loaders over in-memory uint8 tensors.

These loaders are already sharded (each process reads its own ``DistributedSampler``
shard), so they must NOT go through ``accelerator.prepare``: Accelerate would shard them
a second time and silently drop data. Each batch is gathered with one indexing
operation (``__getitems__``), not sample by sample.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .idx import load_split
from .sources import ensure_dataset

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
        if isinstance(indices, range):  # evenly spaced indices: a view of the images, no gather
            view = slice(indices.start, indices.stop, indices.step)
            return self.images[view], self.labels[view], torch.arange(indices.start, indices.stop, indices.step)
        idx = torch.as_tensor(indices, dtype=torch.long)
        idx_here = idx.to(self.images.device, non_blocking=True)
        return self.images[idx_here], self.labels[idx_here], idx


class ShardBatches(Sampler):
    """Batches of a ``DistributedSampler``'s shard, as index tensors or ``range``s.

    Same batches as ``BatchSampler(sampler, batch_size, drop_last=False)``, but the
    epoch's order is turned into one tensor and sliced, instead of building a Python
    list per batch: the loader then costs a few microseconds per step. Unshuffled and
    unpadded, a shard is ``rank, rank + N, rank + 2N, ...``: its batches are then
    ``range``s, which ``TensorImages`` reads as strided views instead of gathering.
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
        step = _even_step(order)
        if step is None:
            return iter(order.split(self.batch_size)[skip:])
        first, n, size = int(order[0]), len(order), self.batch_size
        return (range(first + i * step, first + min(i + size, n) * step, step) for i in range(skip * size, n, size))


def _even_step(order: torch.Tensor) -> int | None:
    """``d`` if ``order`` is ``a, a + d, a + 2d, ...`` with ``d > 0``, else None."""
    if len(order) < 2:
        return 1 if len(order) == 1 else None
    d = int(order[1] - order[0])
    if d <= 0 or not torch.equal(order, order[0] + d * torch.arange(len(order))):
        return None
    return d


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


def load_datasets(cfg, accelerator, splits=("train", "test")) -> list[TensorImages | None]:
    """Fetch the dataset once per node (local main process first); load ``splits`` onto the device.

    Returns ``[train, test]``, with ``None`` for a split not asked for.
    """
    with accelerator.local_main_process_first():
        raw = ensure_dataset(cfg.data_dir, cfg.dataset)
    out = []
    for split in ("train", "test"):
        if split in splits:
            images, labels = load_split(raw, cfg.dataset, split)
            # Data lives on the training device: batches are gathered there, no host copies.
            out.append(TensorImages(images.to(accelerator.device), labels.to(accelerator.device)))
        else:
            out.append(None)
    return out
