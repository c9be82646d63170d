"""system: every rank's node and process readings, in its slot, summarised per node on the main process."""

from __future__ import annotations

import math

import pytest
import torch

from mnist_dist.training.system import READINGS, SystemReadings, per_node


def test_a_rank_reads_its_node_and_process_into_its_own_slot():
    readings = SystemReadings(rank=1, world=3, device=torch.device("cpu"))
    sum(i * i for i in range(200_000))  # some CPU time between two readings
    slots = readings.take()
    n = len(READINGS)
    assert len(slots) == 3 * n and slots[:n] == [0.0] * n and slots[2 * n :] == [0.0] * n
    cpu, memory, rss, device = slots[n : 2 * n]
    assert 0 <= cpu <= 100 and 0 < memory < 100
    assert 50 < rss < 100_000  # this Python process, torch imported: tens of MB at least
    assert math.isnan(device)  # no device memory on the CPU


def test_the_main_process_reports_each_node_once_and_each_rank_in_the_history():
    nan = math.nan
    hosts = ["node-a", "node-a", "node-b"]
    summed = [40.0, 20.0, 900.0, nan, 41.0, 20.5, 800.0, nan, 75.0, 60.0, 1000.0, nan]
    scalars, per_rank = per_node(summed, hosts)
    assert scalars == {
        "nodes/node-a/cpu_percent": 40.0,  # a node-wide reading: its first rank's
        "nodes/node-a/memory_percent": 20.0,
        "nodes/node-a/rss_mb": pytest.approx(1700.0),  # its ranks' together
        "nodes/node-b/cpu_percent": 75.0,
        "nodes/node-b/memory_percent": 60.0,
        "nodes/node-b/rss_mb": pytest.approx(1000.0),
    }
    assert per_rank == {"ranks/rss_mb": [900.0, 800.0, 1000.0]}  # no device memory on CPU processes: left out
    with_gpus = [v if not math.isnan(v) else 512.0 for v in summed]
    scalars, per_rank = per_node(with_gpus, hosts)
    assert scalars["nodes/node-a/device_memory_mb"] == 1024.0 and per_rank["ranks/device_memory_mb"] == [512.0] * 3


def test_on_a_gpu_a_rank_reports_the_memory_its_tensors_hold(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: asked.append(device) or 3 * 2**20)  # mocked GPU
    device = torch.device("cuda", 0)
    *_, device_mb = SystemReadings(rank=0, world=1, device=device).take()
    assert device_mb == 3.0 and asked == [device]
