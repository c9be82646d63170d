"""One optimizer step's mechanics: the fastest correct calls, clipping, and the non-finite check."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError


def step_calls(optimizer, accelerator):
    """The ``(zero_grad, backward, step)`` functions of the training loop.

    Accelerate 1.15's ``AcceleratedOptimizer.step`` looks up an optional package through
    importlib twice per call (``is_lomo_available``), ``zero_grad`` inspects a signature
    per call, and ``Accelerator.backward`` divides the loss by the accumulation steps (one
    more kernel and autograd node, even for 1): about 0.3 ms per step on a 2-core CPU, a
    third of this model's whole step. When the wrappers have nothing to add (no fp16 grad
    scaler, no XLA, DeepSpeed or Megatron, no gradient accumulation) their calls are
    exactly the wrapped ones, so use those directly.
    """
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", None)
    if (
        inner is None
        or getattr(optimizer, "scaler", None) is not None
        or accelerator.scaler is not None
        or accelerator.distributed_type in (DistributedType.XLA, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        or accelerator.gradient_accumulation_steps != 1
    ):
        return (lambda: optimizer.zero_grad(set_to_none=True)), accelerator.backward, optimizer.step
    return (lambda: inner.zero_grad(set_to_none=True)), (lambda loss: loss.backward()), inner.step


class FiniteCheck:
    """Non-finite gradients caught without a host sync per step.

    Each step ORs "some gradient is not finite" into a flag on the device (no sync); ``verify``
    reads it where the loop waits for the device anyway (a log interval, an epoch's end, before
    every checkpoint, so that no checkpoint holds a non-finite value) and names the steps
    since it last looked. With ``check_finite_each_step`` the flag is read at every step, before
    the optimizer step: the exact step is named and the weights never take it.

    The gradients are averaged over ranks (DDP's all-reduce) before they are looked at, and
    one rank's NaN makes the average NaN everywhere: every rank reaches the same verdict at the
    same step, with no extra collective.
    """

    def __init__(self, cfg, device: torch.device) -> None:
        self.enabled, self.each_step, self.lr = cfg.check_finite, cfg.check_finite_each_step, cfg.lr
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self._first: int | None = None  # the first step (1-based) not yet verified

    def observe(self, probe: torch.Tensor, norm, step: int, epoch: int) -> None:
        """Look at the gradients of step ``step + 1``: ``probe`` (some of them), ``norm()`` (for a message)."""
        if not self.enabled:
            return
        if self.each_step:
            if not bool(torch.isfinite(probe).all()):
                raise NonFiniteError(
                    f"the loss is not finite at step {step + 1} (epoch {epoch + 1}): gradient norm {float(norm())}; "
                    f"training stopped before that step changed the weights. {self._advice()}"
                )
            return
        self._bad |= ~torch.isfinite(probe).all()
        self._first = step + 1 if self._first is None else self._first

    def verify(self, step: int, epoch: int) -> None:
        """Raise if some step since the last look had a non-finite gradient; ``step``: steps done so far."""
        if self._first is None:
            return
        first, self._first = self._first, None
        if bool(self._bad):
            where = f"step {step}" if first == step else f"one of steps {first} to {step}"
            raise NonFiniteError(
                f"the loss is not finite at {where} (epoch {epoch + 1}); training stopped "
                f"at step {step}, and no checkpoint holds those weights. {self._advice()} "
                "(--check-finite-each-step names the exact step)"
            )

    def _advice(self) -> str:
        return f"Lower the learning rate (lr is {self.lr}) or clip gradients, e.g. --grad-clip 1.0"


def check_gradients(params: list[torch.nn.Parameter], cfg, finite: FiniteCheck, step: int, epoch: int) -> None:
    """Clip the gradients if asked; hand them to the non-finite check (``finite``) before the optimizer step.

    ``step`` and ``epoch`` are those done so far. Without clipping the check reads only the
    output layer's bias gradient (10 numbers, the last of ``params``): for cross-entropy it is
    ``mean(softmax(logits) - target)``, non-finite exactly when some rank's logits, and so its
    loss, are. A full gradient norm would cost this model a tenth of its step; with clipping
    it is computed anyway, and checked.
    """
    if not (cfg.check_finite or cfg.grad_clip):
        return

    def grad_norm() -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    norm = grad_norm() if cfg.grad_clip else None
    probe = params[-1].grad if norm is None else norm
    finite.observe(probe, lambda: grad_norm() if norm is None else norm, step, epoch)
    if cfg.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm, foreach=True)
