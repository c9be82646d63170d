"""One optimizer step's mechanics: gradient clipping and the non-finite check."""

import pytest
import torch

from mnist_dist.config import Config
from mnist_dist.errors import NonFiniteError
from mnist_dist.training.step import FiniteCheck, check_gradients


def _model_with_gradients(value: float) -> list[torch.nn.Parameter]:
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, value)
    return list(model.parameters())


def test_check_gradients_clips_and_the_exact_check_refuses_nan_before_the_step():
    cfg = Config(grad_clip=1.0)
    params = _model_with_gradients(10.0)
    check_gradients(params, cfg, FiniteCheck(cfg, torch.device("cpu")), step=0, epoch=0)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    assert norm == pytest.approx(1.0, rel=1e-5)
    params[-1].grad[0] = float("nan")
    exact = Config(check_finite_each_step=True)
    with pytest.raises(NonFiniteError, match=r"not finite at step 8 \(epoch 2\).*before that step.*--grad-clip"):
        check_gradients(params, exact, FiniteCheck(exact, torch.device("cpu")), step=7, epoch=1)
    off = Config(check_finite=False)
    check_gradients(params, off, FiniteCheck(off, torch.device("cpu")), step=0, epoch=0)  # opted out: no check


def test_the_default_check_keeps_a_flag_and_names_the_steps_since_it_last_looked():
    cfg = Config()
    finite = FiniteCheck(cfg, torch.device("cpu"))
    good, bad = _model_with_gradients(1.0), _model_with_gradients(float("nan"))
    for step in range(4):  # steps 1-4: fine
        check_gradients(good, cfg, finite, step=step, epoch=0)
    finite.verify(4, 0)
    check_gradients(good, cfg, finite, step=4, epoch=0)
    check_gradients(bad, cfg, finite, step=5, epoch=0)  # step 6: no error yet (no host sync)
    check_gradients(good, cfg, finite, step=6, epoch=0)
    with pytest.raises(NonFiniteError, match=r"one of steps 5 to 7 \(epoch 1\).*no checkpoint holds.*each-step"):
        finite.verify(7, 0)
    finite.verify(7, 0)  # nothing new since: nothing to say
