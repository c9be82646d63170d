"""Every node's system readings in the one run, at log intervals.

wandb samples the system of the process that starts the run: the main process, so a run on
several nodes shows node 0 only (wandb's mode for adding other processes to a run writes to
the server as it goes, and has no offline form). Instead each rank reads its node and its own
process here, and the readings reach the main process in the all-reduce that the log interval
does anyway (one slot per rank, as the timing does): no extra collective, no host sync.

Per rank: its node's CPU use since its last reading and memory in use (from Linux's /proc),
its own resident memory, and on a GPU the memory its tensors hold. A reading that cannot be
taken here is NaN in the slot, and left out of what is logged.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

READINGS = ("cpu_percent", "memory_percent", "rss_mb", "device_memory_mb")
MB = 2**20


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) CPU time of the node since boot, in ticks; None without /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def _memory_percent() -> float:
    """The node's memory in use (not available to new processes), in percent; NaN without /proc."""
    try:
        with open("/proc/meminfo") as meminfo:
            kb = {line.split(":")[0]: int(line.split()[1]) for line in meminfo if line.split()[1:2]}
        return 100 * (1 - kb["MemAvailable"] / kb["MemTotal"])
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        return math.nan


def _rss_mb() -> float:
    """This process's resident memory in MB; NaN without /proc."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return math.nan


class SystemReadings:
    """This rank's readings since the last ``take``, in its slot of a ``world x READINGS`` vector."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device
        self._cpu = _cpu_times()

    def _cpu_percent(self) -> float:
        now, before = _cpu_times(), self._cpu
        self._cpu = now
        if now is None or before is None or now[1] == before[1]:
            return math.nan
        return 100 * (now[0] - before[0]) / (now[1] - before[1])

    def take(self) -> list[float]:
        device_mb = torch.cuda.memory_allocated(self.device) / MB if self.device.type == "cuda" else math.nan
        out = [0.0] * (len(READINGS) * self.world)
        start = len(READINGS) * self.rank
        out[start : start + len(READINGS)] = [self._cpu_percent(), _memory_percent(), _rss_mb(), device_mb]
        return out


def _present(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def per_node(summed: list[float], hosts: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """On the main process: ``(scalars for the tracker, per-rank lists for the history)`` of every
    rank's slot. Per node (``nodes/<host>/...``): its CPU and memory use as its first rank read
    them, and the resident and device memory of all its ranks together."""
    n = len(READINGS)
    rows = [dict(zip(READINGS, summed[n * r : n * (r + 1)], strict=True)) for r in range(len(hosts))]
    scalars: dict[str, float] = {}
    for host in dict.fromkeys(hosts):  # each node once, in rank order
        ranks = [row for row, on in zip(rows, hosts, strict=True) if on == host]
        node = {
            "cpu_percent": ranks[0]["cpu_percent"],
            "memory_percent": ranks[0]["memory_percent"],
            "rss_mb": sum(_present([r["rss_mb"] for r in ranks]) or [math.nan]),
            "device_memory_mb": sum(_present([r["device_memory_mb"] for r in ranks]) or [math.nan]),
        }
        scalars.update({f"nodes/{host}/{key}": value for key, value in node.items() if not math.isnan(value)})
    per_rank = {
        f"ranks/{key}": [None if math.isnan(r[key]) else r[key] for r in rows]
        for key in ("rss_mb", "device_memory_mb")
        if _present([r[key] for r in rows])
    }
    return scalars, per_rank
