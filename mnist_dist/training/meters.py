"""Where training is and what it has measured: the position (steps, epochs, batches), the running
loss sums kept on the device, and the time spent in training steps, its warm-up apart. Each is
saved in checkpoints."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

# The first steps each process trains, after a start or a resume, are its warm-up: the first batch's
# loading, cuBLAS start-up, torch.compile's compilation and CUDA-graph capture.
WARMUP_STEPS = 10


@dataclass
class Position:
    """Where training is: optimizer steps and epochs done, batches done in the current
    epoch, time spent in training steps, and how many of those steps and seconds were warm-up."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    train_seconds: float = 0.0
    warmup_steps: int = 0
    warmup_seconds: float = 0.0


def steady_step_seconds(position: Position) -> float | None:
    """The mean time of a training step after the warm-up; None if every step was warm-up."""
    steps = position.step - position.warmup_steps
    return (position.train_seconds - position.warmup_seconds) / steps if steps > 0 else None


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU, where nothing is queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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
    while a checkpoint is written or the model evaluated; read with the device synchronised.

    The first ``warmup_steps`` steps of this process are also counted apart
    (``position.warmup_seconds``), the device synchronised after each of them; later steps are
    not synchronised, so the steady time per step is what is left over the steps left.
    """

    def __init__(self, position: Position, device: torch.device, warmup_steps: int = WARMUP_STEPS) -> None:
        self.position, self.device, self._since = position, device, None
        self._warmup_left, self._warmup_mark = warmup_steps, None

    def start(self) -> None:
        self._since = time.perf_counter()
        if self._warmup_mark is None:  # this process's first step starts now
            self._warmup_mark = self.position.train_seconds

    def elapsed(self) -> float:
        """``train_seconds`` as it stands, the running part included (not synchronised)."""
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        return self.position.train_seconds + running

    def step_done(self) -> None:
        """A training step was queued: during the warm-up, wait for it and count its time apart."""
        if self._warmup_left == 0:
            return
        synchronize(self.device)
        now = self.elapsed()
        self.position.warmup_seconds += now - self._warmup_mark
        self.position.warmup_steps += 1
        self._warmup_mark, self._warmup_left = now, self._warmup_left - 1

    def stop(self) -> None:
        if self._since is not None:
            synchronize(self.device)
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
