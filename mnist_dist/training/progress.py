"""Training progress on the main process: a bar on a terminal, a few plain lines elsewhere.

On a terminal, a tqdm bar per epoch shows steps, loss and throughput. When stderr is
not a terminal (a SLURM log, CI), the bar would write a line per refresh; instead at
most ``LINES_PER_EPOCH`` plain log lines are written per epoch. Loss and throughput are
refreshed only at log intervals, where the loss is reduced anyway: no extra host syncs.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("mnist_dist")

LINES_PER_EPOCH = 4


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # replaced or closed streams
        return False


class ProgressDisplay:
    """Steps, loss and samples/s of the current epoch; silent when ``enabled`` is false."""

    def __init__(
        self, enabled: bool, samples_per_step: int, stream: TextIO | None = None, interactive: bool | None = None
    ) -> None:
        self.enabled, self.samples_per_step = enabled, samples_per_step
        self.stream = stream or sys.stderr
        self.interactive = is_terminal(self.stream) if interactive is None else interactive
        self._bar = None
        self._epoch = self._epochs = self._total = self._done = 0
        self._next_line = 0.0
        self._last_time = time.perf_counter()

    def start_epoch(self, epoch: int, epochs: int, total_steps: int) -> None:
        """Epoch ``epoch`` (1-based) of ``epochs`` begins; it will run ``total_steps`` steps."""
        self._epoch, self._epochs, self._total, self._done = epoch, epochs, total_steps, 0
        self._next_line = total_steps / LINES_PER_EPOCH
        self._last_time = time.perf_counter()
        if self.enabled and self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                desc=f"epoch {epoch}/{epochs}",
                unit="step",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )

    def advance(self) -> None:
        """One optimizer step done (cheap: tqdm redraws a few times a second at most)."""
        self._done += 1
        if self._bar is not None:
            self._bar.update()

    def interval(self, step: int, loss: float, steps: int) -> float:
        """A log interval of ``steps`` steps ended at ``step`` with mean ``loss``; return samples/s."""
        now = time.perf_counter()
        rate = steps * self.samples_per_step / max(now - self._last_time, 1e-9)
        self._last_time = now
        if not self.enabled:
            return rate
        if self._bar is not None:
            self._bar.set_postfix({"loss": f"{loss:.4f}", "samples/s": f"{rate:,.0f}"})
        elif self._done >= self._next_line and self._done < self._total:
            while self._next_line <= self._done:
                self._next_line += self._total / LINES_PER_EPOCH
            log.info(
                "epoch %d/%d: step %d/%d (%d%%), loss %.4f, %.0f samples/s",
                self._epoch,
                self._epochs,
                self._done,
                self._total,
                100 * self._done // max(self._total, 1),
                loss,
                rate,
            )
        return rate

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
