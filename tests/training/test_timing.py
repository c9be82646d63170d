"""Per-rank timing: each rank's split of its time, assembled on the main process, and a slow rank named."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_dist.training import timing
from mnist_dist.training.timing import RankTiming, Stragglers

from conftest import history, process_tree, read_until, start


def test_a_rank_splits_its_time_into_its_own_slot(monkeypatch):
    clock = iter([0.0, 1.0, 1.5, 4.0, 4.25, 10.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    mine = RankTiming(rank=1, world=3)  # starts at 0.0
    mine.enter("data")  # 1.0: before it, nothing counted
    mine.enter("compute")  # 1.5: 0.5 s of data
    mine.gradient_wait = 0.75  # of the compute, spent waiting in the gradient all-reduce
    mine.enter("evaluation")  # 4.0: 2.5 s of compute; evaluation is not a step's time
    mine.enter("collective")  # 4.25
    split = mine.take()  # 10.0: 5.75 s in the collective
    assert split == [0.0, 0.0, 0.0, 0.5, 1.75, 5.75 + 0.75, 0.0, 0.0, 0.0]
    assert mine.seconds == [0.0, 0.0, 0.0] and mine.gradient_wait == 0.0


def test_a_rank_slower_for_three_intervals_in_a_row_is_named_once(caplog):
    watch = Stragglers(["node1", "node2", "node3"])
    even = [0.1, 1.0, 0.4] * 3
    slow = [0.1, 1.0, 0.4, 0.1, 2.5, 0.0, 0.1, 1.0, 0.4]  # rank 1's own work: 2.6 s, the others 1.1 s
    with caplog.at_level(logging.WARNING, logger="mnist_dist"):
        scalars, per_rank = watch.interval(slow, steps=10)
        watch.interval(even, steps=10)  # not in a row: the count starts again
        for _ in range(3):
            watch.interval(slow, steps=10)
        watch.interval(slow, steps=10)
    assert caplog.text.count("straggler") == 1
    assert "rank 1 (node2) is a straggler" in caplog.text and "2.4x the median" in caplog.text
    assert scalars["timing/slowest_rank"] == 1 and scalars["timing/slowest_over_others"] == pytest.approx(2.6 / 1.1)
    assert per_rank["ranks/compute_s"] == pytest.approx([0.1, 0.25, 0.1])
    assert scalars["timing/data_s"] == pytest.approx(0.01)


@pytest.mark.multiprocess
def test_a_rank_slowed_down_is_named_and_every_ranks_split_is_in_the_history(data_dir, tmp_path):
    """Rank 1 shares its CPU core with two busy loops, rank 0 has the other: rank 0 waits for rank 1."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPU cores to give each rank its own")
    args = [
        "mnist_dist.train",
        *("--config", "configs/train/reference.yaml", "--cpu", "--tracker", "none", "--max-steps", "600"),
        *("--log-every", "50", "--data-dir", str(data_dir), "--output-dir", str(tmp_path)),
    ]
    proc = start(args, 2)
    lines = read_until(proc, "training mnist on 2 process")
    ranks = {_rank_of(p): p for p in process_tree(proc.pid)[1:]}
    cores = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(ranks[0], {cores[0]})
    os.sched_setaffinity(ranks[1], {cores[1]})
    busy = f"import os; os.sched_setaffinity(0, {{{cores[1]}}})\nwhile True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(2)]  # rank 1 keeps a third of its core
    try:
        output = "".join(lines) + proc.communicate(timeout=300)[0]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert proc.returncode == 0, output[-3000:]
    assert "rank 1 (" in output and "is a straggler" in output, output[-3000:]
    steps = [r for r in history(tmp_path) if r["kind"] == "step"]
    assert all(len(r["ranks/compute_s"]) == 2 for r in steps)
    # Every node's system readings (one node here, two ranks on it), in the same all-reduce.
    node = f"nodes/{socket.gethostname()}"
    assert all(0 <= r[f"{node}/cpu_percent"] <= 100 and 0 < r[f"{node}/memory_percent"] < 100 for r in steps)
    assert all(len(r["ranks/rss_mb"]) == 2 and min(r["ranks/rss_mb"]) > 50 for r in steps)
    assert all(r[f"{node}/rss_mb"] == pytest.approx(sum(r["ranks/rss_mb"]), rel=1e-6) for r in steps)
    assert max(r[f"{node}/cpu_percent"] for r in steps) > 50  # both cores busy: the ranks and the busy loops
    assert sum(r["timing/slowest_rank"] == 1 for r in steps) > len(steps) // 2
    print("slowest/others per interval:", [round(r["timing/slowest_over_others"], 2) for r in steps])


def _rank_of(pid: int) -> int | None:
    env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
    return int(env[b"RANK"]) if b"RANK" in env else None
