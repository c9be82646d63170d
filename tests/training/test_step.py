"""One optimizer step's mechanics: gradient clipping and the non-finite check."""

import pytest
import torch


def test_check_gradients_clips_and_refuses_nan():
    from mnist_dist.config import Config
    from mnist_dist.errors import NonFiniteError
    from mnist_dist.training.step import check_gradients

    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    params = list(model.parameters())
    check_gradients(params, Config(grad_clip=1.0), step=0, epoch=0)
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert norm == pytest.approx(1.0, rel=1e-5)
    model.bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"not finite at step 8 \(epoch 2\).*--grad-clip"):
        check_gradients(params, Config(), step=7, epoch=1)
    check_gradients(params, Config(check_finite=False), step=0, epoch=0)  # opted out: no check
