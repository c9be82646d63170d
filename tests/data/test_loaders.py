import pytest
import torch

from mnist_dist.data.loaders import ShardBatches, TensorImages, make_loader, shard_sampler, to_inputs


def _dataset(n: int) -> TensorImages:
    return TensorImages(torch.arange(n, dtype=torch.uint8).repeat_interleave(4).reshape(n, 2, 2), torch.arange(n) % 10)


def _epoch(n, batch, world, shuffle, epoch=0, seed=0):
    """Per-rank lists of batches of dataset indices for one epoch."""
    ds = _dataset(n)
    out = []
    for rank in range(world):
        loader = make_loader(ds, batch, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        shard_sampler(loader).set_epoch(epoch)
        out.append([idx.tolist() for _, _, idx in loader])
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_seen_exactly_once_per_epoch(world, shuffle):
    per_rank = _epoch(120, 10, world, shuffle)
    seen = sorted(i for rank in per_rank for b in rank for i in b)
    assert seen == list(range(120))


@pytest.mark.parametrize("world", [2, 4])
def test_global_batches_equal_the_single_process_batches(world):
    """Batch k over all ranks is the same set of samples as batch k of one process."""
    single = _epoch(256, 32, 1, shuffle=True, epoch=3)[0]
    sharded = _epoch(256, 32 // world, world, shuffle=True, epoch=3)
    assert len(single) == len(sharded[0])
    for k, batch in enumerate(single):
        assert sorted(i for rank in sharded for i in rank[k]) == sorted(batch)


def test_shuffle_is_seeded_and_changes_with_epoch():
    a = _epoch(100, 10, 1, True, epoch=0)
    assert a == _epoch(100, 10, 1, True, epoch=0)
    assert a != _epoch(100, 10, 1, True, epoch=1)
    assert a != _epoch(100, 10, 1, True, epoch=0, seed=1)
    assert _epoch(100, 10, 1, False)[0][0] == list(range(10))


def test_uneven_world_size_pads_equally():
    per_rank = _epoch(10, 2, 3, shuffle=False)
    assert [sum(map(len, r)) for r in per_rank] == [4, 4, 4]


def test_batches_carry_images_labels_and_indices():
    ds = _dataset(20)
    images, labels, idx = next(iter(make_loader(ds, 5, num_replicas=1, rank=0, shuffle=False, seed=0)))
    assert images.dtype == torch.uint8 and images.shape == (5, 2, 2)
    assert torch.equal(images, ds.images[idx]) and torch.equal(labels, ds.labels[idx])


def test_to_inputs_scales_to_unit_interval():
    x = to_inputs(torch.tensor([[0, 255, 51]], dtype=torch.uint8), torch.device("cpu"))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.tensor([[0.0, 1.0, 0.2]]))


@pytest.mark.parametrize("n, world, shuffle", [(103, 3, True), (103, 3, False), (96, 3, False), (96, 1, False)])
def test_shard_batches_equal_torch_batch_sampler(n, world, shuffle):
    from torch.utils.data import BatchSampler, DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=world - 1, shuffle=shuffle, seed=4)
    sampler.set_epoch(2)
    expected = [b for b in BatchSampler(sampler, 8, drop_last=False)]
    got = [[int(i) for i in b] for b in ShardBatches(sampler, 8)]
    assert got == expected and len(ShardBatches(sampler, 8)) == len(expected)
    batches = ShardBatches(sampler, 8)
    batches.skip_next(3)
    assert [[int(i) for i in b] for b in batches] == expected[3:]


def test_unshuffled_batches_are_views_not_copies():
    ds = _dataset(96)
    for rank in (0, 1):
        loader = make_loader(ds, 8, num_replicas=2, rank=rank, shuffle=False, seed=0)
        seen = []
        for images, labels, idx in loader:
            for view, whole in ((images, ds.images), (labels, ds.labels)):  # no gather: the same memory
                assert view.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            assert torch.equal(images, ds.images[idx]) and torch.equal(labels, ds.labels[idx])
            seen.append(idx)
        assert torch.equal(torch.cat(seen), torch.arange(rank, 96, 2))
