"""One optimizer step's mechanics: the fastest correct calls, and the gradient checks before the step."""

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


def check_gradients(params: list[torch.nn.Parameter], cfg, step: int, epoch: int) -> None:
    """Clip the gradients if asked; refuse non-finite ones before the optimizer step.

    ``step`` and ``epoch`` are those done so far (for the message). The gradients are
    already averaged over ranks (DDP's all-reduce), and one rank's NaN makes the average
    NaN everywhere: every rank reaches the same verdict at the same step, with no extra
    collective. Without clipping the check reads only the output layer's bias gradient (10
    numbers, the last of ``params``): for cross-entropy it is ``mean(softmax(logits) -
    target)``, non-finite exactly when some rank's logits, and so its loss, are. A full
    gradient norm would cost this model a tenth of its step; with clipping it is computed
    anyway, and checked.
    """
    if not (cfg.check_finite or cfg.grad_clip):
        return

    def grad_norm() -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    norm = grad_norm() if cfg.grad_clip else None
    probe = params[-1].grad if norm is None else norm
    if cfg.check_finite and not bool(torch.isfinite(probe).all()):
        raise NonFiniteError(
            f"the loss is not finite at step {step + 1} (epoch {epoch + 1}): gradient norm "
            f"{float(grad_norm() if norm is None else norm)}; training stopped before that step changed the "
            f"weights. Lower the learning rate (lr is {cfg.lr}) or clip gradients, e.g. --grad-clip 1.0"
        )
    if cfg.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, norm, foreach=True)
