"""Where training is and what it has measured: the position (steps, epochs, batches), the running
loss sums kept on the device, and the time spent in training steps. Each is saved in checkpoints."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Position:
    """Where training is: optimizer steps and epochs done, batches done in the current
    epoch, time spent in training steps."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    train_seconds: float = 0.0


class LossMeter:
    """Running sums of the training loss, kept on the device (no host sync until a log interval):
    one for the current log interval, one for the epoch so far."""

    def __init__(self, device: torch.device) -> None:
        self.interval, self.epoch = torch.zeros((), device=device), torch.zeros((), device=device)
        self.interval_steps = self.epoch_steps = 0

    def add(self, loss: torch.Tensor) -> None:
        self.interval += loss.detach()
        self.interval_steps += 1

    def interval_mean(self) -> torch.Tensor:
        return self.interval / self.interval_steps

    def end_interval(self) -> None:
        """Fold the interval into the epoch's sums and start a new interval."""
        self.epoch += self.interval
        self.epoch_steps += self.interval_steps
        self.interval.zero_()
        self.interval_steps = 0

    def epoch_mean(self) -> torch.Tensor:
        """The mean loss of the epoch so far (this rank's), leaving every sum as it is."""
        return (self.epoch + self.interval) / max(self.epoch_steps + self.interval_steps, 1)

    def end_epoch(self) -> torch.Tensor:
        """The epoch's mean loss (this rank's); all sums start again at zero."""
        self.end_interval()
        mean = self.epoch / max(self.epoch_steps, 1)
        self.epoch.zero_()
        self.epoch_steps = 0
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {
            "interval_loss": self.interval.item(),
            "interval_steps": self.interval_steps,
            "epoch_loss": self.epoch.item(),
            "epoch_steps": self.epoch_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.interval.fill_(state["interval_loss"])
        self.epoch.fill_(state["epoch_loss"])
        self.interval_steps, self.epoch_steps = state["interval_steps"], state["epoch_steps"]


class Stopwatch:
    """Time spent training (``position.train_seconds``): running during an epoch's steps, not
    while a checkpoint is written or the model evaluated."""

    def __init__(self, position: Position) -> None:
        self.position, self._since = position, None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.position.train_seconds += time.perf_counter() - self._since
            self._since = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()
