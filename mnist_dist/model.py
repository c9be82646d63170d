"""The multilayer perceptron. Imports only torch: no distributed or data logic here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGE_PIXELS = 28 * 28
NUM_CLASSES = 10


class MLP(nn.Module):
    """784 -> hidden (ReLU) ... -> 10 perceptron; returns logits.

    With the default ``hidden_sizes=(256,)`` this is ``O = W_o relu(W_h X + b_h) + b_o``.
    Parameter names are ``layers.{i}.weight`` / ``layers.{i}.bias`` for the i-th linear layer.
    """

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (256,),
        in_features: int = IMAGE_PIXELS,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden_sizes, num_classes]
        self.hidden_sizes = tuple(hidden_sizes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, 28, 28)`` or ``(N, 784)`` (float) to logits ``(N, 10)``."""
        x = x.reshape(x.shape[0], -1)
        *hidden, last = self.layers  # not self.layers[:-1], which builds a new ModuleList per call
        for layer in hidden:
            x = torch.relu(layer(x))
        return last(x)


def hidden_sizes_from_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Recover ``hidden_sizes`` from a saved ``MLP`` state dict (weights are ``out x in``)."""
    n_layers = len([k for k in state_dict if k.startswith("layers.") and k.endswith(".weight")])
    if n_layers == 0:
        raise ValueError("not an MLP state dict: no 'layers.N.weight' tensors found")
    return tuple(state_dict[f"layers.{i}.weight"].shape[0] for i in range(n_layers - 1))
