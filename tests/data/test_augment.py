import pytest
import torch
import torch.nn.functional as F

from mnist_dist.data.augment import Augmenter, AugmentSpec, affine_matrices

CPU = torch.device("cpu")


def _images(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 28, 28)
    x[:, 6:22, 6:22] = torch.rand(n, 16, 16, generator=gen)  # content away from the border
    return x


def _warp(images, theta):
    grid = F.affine_grid(theta, [len(images), 1, 28, 28], align_corners=False)
    return F.grid_sample(images.unsqueeze(1), grid, align_corners=False).squeeze(1)


def _one(**params):
    order = ("tx", "ty", "rot", "zoom", "shear")
    return torch.tensor([[float(params.get(k, 0)) for k in order]])


def test_zero_spec_leaves_images_unchanged():
    aug = Augmenter(AugmentSpec(), 16, seed=0, device=CPU)
    aug.set_epoch(0)
    x = _images()
    assert not AugmentSpec().enabled
    torch.testing.assert_close(aug(x, torch.arange(16)), x, atol=1e-5, rtol=0)


def test_shift_moves_the_picture_right_and_down_by_whole_pixels():
    x = _images(1)
    theta = affine_matrices(_one(tx=1, ty=1), AugmentSpec(translate=3), 28)
    expected = torch.roll(x, shifts=(3, 3), dims=(1, 2))
    torch.testing.assert_close(_warp(x, theta), expected, atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_is_rot90():
    x = _images(1)
    theta = affine_matrices(_one(rot=1), AugmentSpec(rotate=90), 28)
    # rot90 with k=1 turns the picture a quarter turn counter-clockwise on screen.
    torch.testing.assert_close(_warp(x, theta), torch.rot90(x, k=1, dims=(1, 2)), atol=1e-5, rtol=0)


def test_zoom_enlarges_the_picture():
    x = torch.zeros(1, 28, 28)
    x[0, 10:18, 10:18] = 1.0
    bigger = _warp(x, affine_matrices(_one(zoom=1), AugmentSpec(scale=0.5), 28))
    smaller = _warp(x, affine_matrices(_one(zoom=-1), AugmentSpec(scale=0.5), 28))
    # Ink area scales with the square of the zoom factor: 1.5**2 and 0.5**2.
    assert bigger.sum() / x.sum() == pytest.approx(2.25, rel=0.05)
    assert smaller.sum() / x.sum() == pytest.approx(0.25, rel=0.05)


def test_batched_grids_equal_affine_grid():
    spec = AugmentSpec(translate=2, rotate=15, scale=0.1, shear=10)
    aug = Augmenter(spec, 100, seed=3, device=CPU)
    aug.set_epoch(2)
    x, idx = _images(32), torch.randperm(100)[:32]
    theta = aug.coeffs[idx].transpose(1, 2)
    torch.testing.assert_close(aug(x, idx), _warp(x, theta), atol=1e-5, rtol=0)


def test_draws_depend_on_seed_epoch_and_image_only():
    spec = AugmentSpec(translate=2, rotate=10, elastic=1.0)
    a, b, c = (Augmenter(spec, 50, seed=s, device=CPU) for s in (0, 0, 1))
    a.set_epoch(1), b.set_epoch(1), c.set_epoch(1)
    assert torch.equal(a.coeffs, b.coeffs)
    assert not torch.allclose(a.coeffs, c.coeffs)
    b.set_epoch(2)
    assert not torch.allclose(a.coeffs, b.coeffs)
    # Split a batch over two "ranks" as a DistributedSampler does: each image is warped the same.
    x, idx = _images(20), torch.randperm(50)[:20]
    whole = a(x, idx)
    torch.testing.assert_close(a(x[0::2], idx[0::2]), whole[0::2], atol=0, rtol=0)
    torch.testing.assert_close(a(x[1::2], idx[1::2]), whole[1::2], atol=0, rtol=0)


def test_elastic_field_is_smooth_and_of_the_asked_size():
    spec = AugmentSpec(elastic=1.5)
    aug = Augmenter(spec, 2000, seed=0, device=CPU)
    aug.set_epoch(0)
    identity = Augmenter(AugmentSpec(), 1, seed=0, device=CPU)
    identity.set_epoch(0)
    disp = (aug.grids(torch.arange(2000)) - identity.grids(torch.zeros(1, dtype=torch.long))) * 14  # pixels
    assert 0.6 * 1.5 < disp.std() < 1.5
    # Smooth: neighbouring pixels move almost together (in a field of independent
    # displacements the mean step between neighbours would be 1.4x the mean displacement).
    step = (disp[:, 1:] - disp[:, :-1]).abs().mean()
    assert step < 0.3 * disp.abs().mean()
    x = _images(8)
    warped = aug(x, torch.arange(8))
    assert not torch.allclose(warped, x)
    assert warped.sum() / x.sum() == pytest.approx(1.0, abs=0.15)  # strokes bend, ink stays


def test_set_epoch_is_required():
    aug = Augmenter(AugmentSpec(translate=1), 4, seed=0, device=CPU)
    with pytest.raises(RuntimeError, match="set_epoch"):
        aug(_images(2), torch.arange(2))
