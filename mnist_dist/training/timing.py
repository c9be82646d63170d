"""Where each rank's step time goes, and which rank the others wait for.

Each rank splits its time between two log intervals into waiting for data, its own compute,
and waiting in collectives: the interval's loss all-reduce and, on CPU processes, the
gradient all-reduce inside backward (timed by a DDP communication hook, from the moment
this rank's gradients are ready until every rank's are summed). The split reaches every
rank inside the all-reduce that the log interval does anyway (one slot per rank), so it
costs no extra collective and no host synchronisation per step. On GPUs the gradient
all-reduce runs asynchronously on the device: no hook is installed there, and its wait
counts as compute.

A rank whose own work (data + compute) per step is persistently above the others' median
is named once in a log line: the others spend that difference waiting for it.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

log = logging.getLogger("mnist_dist")

PARTS = ("data", "compute", "collective")
# A rank is a straggler when its own work per step exceeds the median of the other ranks' by this
# factor in this many log intervals in a row (one slow interval is noise: a page fault, a
# checkpoint of another job on the node).
STRAGGLER_RATIO, STRAGGLER_INTERVALS = 1.3, 3


def _timed_allreduce(timing: RankTiming, bucket):
    """DDP's own all-reduce of a gradient bucket, timed until the sum is there."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    start = time.perf_counter()

    def done(future):
        timing.gradient_wait += time.perf_counter() - start
        return future.value()

    return allreduce_hook(None, bucket).then(done)


class RankTiming:
    """This rank's split of its time into ``PARTS`` since the last ``take``."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.seconds = [0.0] * len(PARTS)
        self.gradient_wait = 0.0
        self._part: str | None = None
        self._since = time.perf_counter()

    def time_gradient_allreduce(self, model, device_type: str) -> None:
        """On CPU processes, time DDP's gradient all-reduce (see the module's docstring)."""
        if self.world > 1 and device_type == "cpu" and hasattr(model, "register_comm_hook"):
            model.register_comm_hook(self, _timed_allreduce)

    def enter(self, part: str) -> None:
        """From now on this rank's time goes to ``part`` (one of ``PARTS``, or anything else: not counted)."""
        now = time.perf_counter()
        if self._part in PARTS:
            self.seconds[PARTS.index(self._part)] += now - self._since
        self._part, self._since = part, now

    def take(self) -> list[float]:
        """This rank's split since the last take, in its slot of a ``world x PARTS`` vector (zeros
        elsewhere), for the interval's all-reduce to assemble every rank's."""
        self.enter(self._part)
        data, compute, collective = self.seconds
        waited = min(self.gradient_wait, compute)
        out = [0.0] * (len(PARTS) * self.world)
        out[len(PARTS) * self.rank : len(PARTS) * (self.rank + 1)] = [data, compute - waited, collective + waited]
        self.seconds, self.gradient_wait = [0.0] * len(PARTS), 0.0
        return out


class Stragglers:
    """On the main process: the per-rank splits of each interval, summarised, and stragglers named once."""

    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts
        self._slow_for = [0] * len(hosts)
        self._named: set[int] = set()

    def interval(self, summed: list[float], steps: int) -> tuple[dict[str, float], dict[str, Any]]:
        """``(scalars for the tracker, per-rank lists for the history)`` of one interval's splits."""
        n = len(PARTS)
        per_step = [[v / max(steps, 1) for v in summed[n * r : n * (r + 1)]] for r in range(len(self.hosts))]
        own = [data + compute for data, compute, _ in per_step]
        slowest = max(range(len(own)), key=own.__getitem__)
        ratios = [seconds / _median_of_others(own, rank) for rank, seconds in enumerate(own)]
        self._name_persistent(ratios)
        scalars = {
            **{f"timing/{part}_s": statistics.fmean(r[i] for r in per_step) for i, part in enumerate(PARTS)},
            "timing/slowest_rank": slowest,
            "timing/slowest_over_others": ratios[slowest],
        }
        return scalars, {f"ranks/{part}_s": [r[i] for r in per_step] for i, part in enumerate(PARTS)}

    def _name_persistent(self, ratios: list[float]) -> None:
        for rank, ratio in enumerate(ratios):
            self._slow_for[rank] = self._slow_for[rank] + 1 if ratio > STRAGGLER_RATIO else 0
            if self._slow_for[rank] >= STRAGGLER_INTERVALS and rank not in self._named:
                self._named.add(rank)
                log.warning(
                    "rank %d (%s) is a straggler: its own work per step (data + compute) took %.1fx the median "
                    "of the other ranks' for %d log intervals in a row; they wait for it in every all-reduce",
                    rank,
                    self.hosts[rank],
                    ratio,
                    STRAGGLER_INTERVALS,
                )


def _median_of_others(own: list[float], rank: int) -> float:
    others = own[:rank] + own[rank + 1 :]
    return (statistics.median(others) if others else own[rank]) or 1e-12
