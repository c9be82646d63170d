import math

import pytest
import torch

from mnist_dist.training.schedule import SCHEDULES, build_scheduler, lr_factor, total_steps


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warmup_rises_linearly_to_the_full_rate(schedule):
    factors = [lr_factor(s, 100, schedule, warmup_steps=4) for s in range(5)]
    assert factors == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_decays_reach_zero_at_the_last_step():
    total, warmup = 110, 10
    cosine = [lr_factor(s, total, "cosine", warmup) for s in range(total + 1)]
    linear = [lr_factor(s, total, "linear", warmup) for s in range(total + 1)]
    assert cosine[warmup] == linear[warmup] == 1.0
    assert cosine[60] == pytest.approx(0.5) and linear[60] == pytest.approx(0.5)  # half-way through the decay
    assert cosine[35] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine[total] == pytest.approx(0.0, abs=1e-12) and linear[total] == 0.0
    assert all(a >= b for a, b in zip(cosine[warmup:], cosine[warmup + 1 :]))
    assert all(lr_factor(s, total, "constant") == 1.0 for s in range(total))


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor(0, 10, "step")


def test_total_steps():
    assert total_steps(epochs=3, steps_per_epoch=100, max_steps=None) == 300
    assert total_steps(epochs=3, steps_per_epoch=100, max_steps=250) == 250
    assert total_steps(epochs=3, steps_per_epoch=100, max_steps=1000) == 300


def test_scheduler_sets_the_lr_of_each_optimizer_step():
    """Stepped once per optimizer step, the lr used by step s is lr * lr_factor(s)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4, momentum=0.9)
    sched = build_scheduler(opt, "cosine", total=20, warmup_fraction=0.1)
    used = []
    for _ in range(20):
        used.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert used == pytest.approx([0.4 * lr_factor(s, 20, "cosine", warmup_steps=2) for s in range(20)])
    assert used[0] == pytest.approx(0.4 / 3) and max(used) == pytest.approx(0.4)
