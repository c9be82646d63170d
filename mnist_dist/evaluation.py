"""Exact global evaluation: every test image counted once, for any number of processes.

Each process evaluates its ``DistributedSampler`` shard; predictions are gathered to all
processes and the sampler's padding (repeated samples added so every rank has as many)
is removed, so the metrics equal those of one process on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .data.loaders import shard_sampler, to_inputs
from .model import NUM_CLASSES

# Misclassified images kept at the end of a run (misclassified.safetensors, the tracker's grid and table).
MAX_MISCLASSIFIED = 64


@dataclass(frozen=True)
class EvalResult:
    """Global metrics of one evaluation."""

    correct: int
    total: int
    loss: float  # mean cross-entropy over the ``total`` images
    confusion: torch.Tensor  # (10, 10) int64, rows = true label, columns = prediction
    predictions: torch.Tensor | None = None  # (total,) predicted class of each image, dataset order

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def per_class_accuracy(self) -> list[float]:
        per_class = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diag() / per_class).tolist()

    def metrics(self, detailed: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "test_accuracy": self.accuracy,
            "test_correct": self.correct,
            "test_total": self.total,
            "test_loss": self.loss,
        }
        if detailed:
            out["per_class_accuracy"] = self.per_class_accuracy
            out["confusion_matrix"] = self.confusion.tolist()
        return out


def _nowhere(phase: str) -> None:
    """Progress told to no one (evaluation outside a watched run)."""


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator, progress: Callable[[str], None] = _nowhere) -> EvalResult:
    """Evaluate ``model`` on ``loader`` (a ``make_loader`` loader) across all processes. ``progress(phase)``
    is told where this rank is (for the stall watchdog): ``"evaluation"`` after each batch, then
    ``"evaluated"`` while it waits for the other ranks' shards."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    preds, labels_seen, losses, indices = [], [], [], []
    for images, labels, idx in loader:
        logits = model(to_inputs(images, device))
        labels = labels.to(device, non_blocking=True)
        losses.append(F.cross_entropy(logits.float(), labels, reduction="none"))
        preds.append(logits.argmax(dim=1))
        labels_seen.append(labels)
        indices.append(idx.to(device))
        progress("evaluation")
    model.train(was_training)
    progress("evaluated")
    sampler = shard_sampler(loader)
    n_local = sum(len(i) for i in indices)
    # Position j of this rank's shard is position j * world + rank of the padded list;
    # positions past the dataset's end are the sampler's padding.
    keep = torch.arange(n_local, device=device) * sampler.num_replicas + sampler.rank < len(loader.dataset)
    local = [torch.cat(t) for t in (preds, labels_seen, losses, indices)] + [keep]
    pred, label, loss, index, keep = (accelerator.gather(t) for t in local)
    pred, label, loss, index = pred[keep], label[keep], loss[keep], index[keep]
    total = len(loader.dataset)
    index, order = torch.sort(index)  # dataset order: the loss sum no longer depends on world size
    pred, label, loss = pred[order], label[order], loss[order]
    if not torch.equal(index, torch.arange(total, device=device)):
        raise RuntimeError(f"evaluation covered {len(index)} images, not each of {total} once")
    confusion = torch.bincount(label * NUM_CLASSES + pred, minlength=NUM_CLASSES**2)
    return EvalResult(
        correct=int((pred == label).sum()),
        total=total,
        loss=float(loss.double().mean()),
        confusion=confusion.reshape(NUM_CLASSES, NUM_CLASSES).cpu(),
        predictions=pred,
    )


def misclassified_examples(
    predictions: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None,
    limit: int = MAX_MISCLASSIFIED,
) -> dict[str, torch.Tensor]:
    """The first ``limit`` wrongly predicted images (dataset order), on the CPU.

    ``probabilities``: the model's class probabilities of some images (uint8, N x 28 x 28 ->
    N x classes), given by the trainer so that tracking holds no model code; called for
    these few images only, and kept as ``probabilities``.
    """
    index = (predictions != labels).nonzero().flatten()[:limit]
    examples = {
        "images": images[index].cpu(),
        "predicted": predictions[index].cpu(),
        "label": labels[index].cpu(),
        "index": index.cpu(),
    }
    if probabilities is not None:
        examples["probabilities"] = probabilities(examples["images"]).float().cpu()
    return examples
