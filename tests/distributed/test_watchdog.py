"""The stall watchdog: who it names, judged from the ranks' progress files; and, for real, a stopped,
a killed and a slow-but-healthy rank of a 2-process run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_dist.distributed.watchdog import PROGRESS_DIR, STALLED_EXIT, Peer, Watchdog, watchdog_for

from conftest import REPO, assert_same_weights, history, process_tree, read_metrics, read_until, run_cli

T = 10.0  # stall_timeout of the in-process ranks below (their clock is passed in, not waited for)


def ranks(tmp_path, world: int = 2) -> list[Watchdog]:
    """The watchdogs of ``world`` ranks sharing a run directory, their threads not started."""
    dogs = [Watchdog(tmp_path, r, world, T) for r in range(world)]
    for dog in dogs:
        dog.dir.mkdir(parents=True, exist_ok=True)
        dog._peers = {r: Peer() for r in range(world)}
    return dogs


def beat(dogs, now: float) -> None:
    for dog in dogs:
        dog._publish()
    for dog in dogs:
        dog._read(now)


def test_a_rank_whose_heartbeat_stops_is_named_silent(tmp_path):
    zero, one = ranks(tmp_path)
    zero.mark("compute", 41), one.mark("compute", 41)
    beat([zero, one], 0.0)
    assert zero.judge(T / 2) == ([], False)
    zero.mark("collective")  # waits for rank 1, which stopped: its file no longer changes
    beat([zero], T / 2)
    assert zero.judge(T / 2 + 1) == ([], False)
    assert zero.judge(T + 1) == ([1], True)


def test_of_live_ranks_that_stopped_progressing_the_one_behind_is_named(tmp_path):
    zero, one = ranks(tmp_path)
    zero.mark("collective", 7)  # done with step 7's work, waiting
    one.mark("data", 7)  # stuck fetching its batch: alive, no progress
    for now in (0.0, T / 2, T + 1):
        beat([zero, one], now)  # both heartbeats go on
    assert zero.judge(T + 1) == one.judge(T + 1) == ([1], False)


def test_progress_keeps_a_slow_rank_out_of_it_and_a_finished_rank_is_not_judged(tmp_path):
    zero, one = ranks(tmp_path)
    for now in (0.0, T / 2, T, 1.5 * T, 2 * T):
        zero.mark("evaluation", 5), one.mark("evaluation", 5)  # a long evaluation: a mark per batch
        beat([zero, one], now)
    assert zero.judge(2 * T) == ([], False)
    one.mark("finished")  # rank 1 is done; its heartbeat stops
    beat([zero, one], 2 * T)
    for now in (3 * T, 4 * T):
        zero.mark("evaluation")
        beat([zero], now)
    assert zero.judge(4 * T) == ([], False)


def test_a_rank_waiting_for_a_peer_that_still_progresses_is_not_a_stall(tmp_path):
    """Rank 0 finished its shard of the evaluation and waits in the gather; rank 1's shard takes longer."""
    zero, one = ranks(tmp_path)
    zero.mark("evaluated", 19)  # its shard done, it waits in the gather
    for now in (0.0, T / 2, T, 1.5 * T, 2 * T):
        one.mark("evaluation", 19)  # a batch of rank 1's evaluation
        beat([zero, one], now)
    assert zero.judge(2 * T) == one.judge(2 * T) == ([], False)
    for now in (2.5 * T, 3 * T + 1):  # then rank 1 stops progressing too: a stall, rank 1's
        beat([zero, one], now)
    assert zero.judge(3 * T + 1) == ([1], False)


def test_a_peer_whose_process_ended_on_this_host_is_named_lost_at_once(tmp_path):
    zero, one = ranks(tmp_path)
    one.mark("compute", 12)
    beat([zero, one], 0.0)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / PROGRESS_DIR / "rank-1.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": int(ended.stdout)}))
    start = time.monotonic()
    lost = zero.lost_peers(wait=5)
    assert time.monotonic() - start < 2
    assert lost == {1: f"rank 1 (pid {int(ended.stdout)} on {socket.gethostname()}, last seen at step 12)"}


def test_one_process_or_no_timeout_has_no_watchdog(tmp_path):
    assert not isinstance(watchdog_for(tmp_path, 0, 1, 120), Watchdog)
    assert not isinstance(watchdog_for(tmp_path, 0, 2, 0), Watchdog)
    assert isinstance(watchdog_for(tmp_path, 0, 2, 120), Watchdog)


# -- real runs: 2 CPU processes under torch's launcher --------------------------------------


def train_args(data_dir, out: Path, *extra: str) -> list[str]:
    """``-m mnist_dist.train`` with the reference recipe on the CPU into ``out``."""
    return [
        "mnist_dist.train",
        *("--config", "configs/train/reference.yaml", "--cpu", "--tracker", "none", "--log-every", "25"),
        *("--data-dir", str(data_dir), "--output-dir", str(out), *extra),
    ]


def torchrun(args: list[str], restarts: int = 0) -> list[str]:
    """``args`` (a ``-m`` module and its options) on 2 CPU processes under torch's launcher."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", str(restarts)] + [
        "-m",
        *args,
    ]


def rank_pid(launcher: int, rank: int) -> int:
    for pid in process_tree(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def launched(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def ours(output: str) -> list[str]:
    """The lines of our processes' tracebacks (the launcher's own report is outside the project)."""
    return [line for line in output.splitlines() if line.strip().startswith("File ") and "mnist_dist" in line]


@pytest.mark.multiprocess
def test_a_stopped_rank_is_named_within_the_stall_timeout_and_nothing_is_left_running(data_dir, tmp_path):
    run = tmp_path / "run"
    limits = ["--max-steps", "3000", "--checkpoint-every", "100", "--stall-timeout", "4"]
    proc = launched(torchrun(train_args(data_dir, run, *limits)))
    lines = read_until(proc, "step 237/938")  # past the first checkpoint
    tree = process_tree(proc.pid)
    stopped = rank_pid(proc.pid, 1)
    os.kill(stopped, signal.SIGSTOP)
    began = time.monotonic()
    try:
        output = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        for pid in tree:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGCONT)
    took = time.monotonic() - began
    errors = [line for line in output.splitlines() if line.startswith("Error: the run stalled")]
    assert proc.returncode != 0 and len(errors) == 1, output[-3000:]
    assert f"rank 1 (pid {stopped} on " in errors[0] and "silent" in errors[0], errors
    assert f"exitcode  : {STALLED_EXIT}" in output or f"exitcode: {STALLED_EXIT}" in output.replace("  ", " ")
    assert not ours(output), output[-3000:]
    step = int(errors[0].split(" at step ")[1].split(",")[0])
    stacks = run / "stalls" / f"step-{step:08d}" / "rank-0.txt"
    assert "Thread" in stacks.read_text() and "mnist_dist" in stacks.read_text()
    time.sleep(1)
    assert not [
        p for p in tree if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
    ]
    assert took < 4 + 10, took  # the stall timeout, a heartbeat, and the launcher's teardown
    again = run_cli(train_args(data_dir, run, *limits[:4]))  # on one process: a rerun may have fewer
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr[-3000:]
    print(f"rank 1 stopped at step {step}: job ended after {took:.1f} s; {errors[0]}")


@pytest.mark.multiprocess
def test_a_killed_rank_is_named_in_one_line_within_seconds(data_dir, tmp_path):
    proc = launched(torchrun(train_args(data_dir, tmp_path / "run", "--max-steps", "3000")))
    lines = read_until(proc, "samples/s")
    killed = rank_pid(proc.pid, 1)
    os.kill(killed, signal.SIGKILL)
    began = time.monotonic()
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    took = time.monotonic() - began
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert proc.returncode != 0 and len(errors) == 1, output[-3000:]
    assert errors[0].startswith(f"Error: lost rank 1 (pid {killed} on "), errors
    assert "rank 0 stopped at step" in errors[0] and not ours(output), output[-3000:]
    assert took < 15, took
    print(f"rank 1 killed: {errors[0]} ({took:.1f} s)")


@pytest.mark.multiprocess
def test_a_long_healthy_evaluation_does_not_trip_the_watchdog(data_dir, tmp_path):
    """10,000 test images one by one through a wider MLP take longer than the stall timeout: progress is
    marked per batch."""
    # About 8 s of evaluation here (4 s with 1536,1536, which a faster moment of the machine once took in 2.6 s).
    slow = ("--max-steps", "20", "--stall-timeout", "2", "--eval-batch-size", "1", "--hidden-sizes", "2048,2048")
    proc = run_cli(train_args(data_dir, tmp_path, *slow), processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "metrics.json")["eval_seconds"] > 2 * 1.5  # longer than the stall timeout
    assert [r["step"] for r in history(tmp_path) if r["kind"] == "epoch"] == [20]


@pytest.mark.multiprocess
def test_torchrun_restarts_after_a_lost_rank_and_ends_bit_identical(data_dir, tmp_path):
    from wandb_files import offline_runs

    run, straight = tmp_path / "restarted", tmp_path / "straight"
    wandb = ["--max-steps", "1200", "--checkpoint-every", "200", "--tracker", "wandb"]
    proc = launched(torchrun(train_args(data_dir, run, *wandb), restarts=2))
    lines = read_until(proc, "step 475/938")  # past the checkpoint of step 400
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output and "lost rank 1" in output, output[-3000:]
    done = run_cli(torchrun(train_args(data_dir, straight, *wandb))[2:])  # python -m torch.distributed.run
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(run / "model.safetensors", straight / "model.safetensors")
    steps = [r["step"] for r in history(run) if r["kind"] == "step"]
    assert steps == list(range(25, 1201, 25))
    assert len({p.name.rsplit("-", 1)[1] for p in offline_runs(run)}) == 1


def accelerate_launch(args: list[str], restarts: int = 0) -> list[str]:
    """``args`` on 2 CPU processes under ``accelerate launch --max_restarts`` (torch's launcher underneath)."""
    config = str(REPO / "configs/accelerate/cpu.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2"]
    return [*launch, "--max_restarts", str(restarts), "-m", *args]


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", [torchrun, accelerate_launch], ids=["torchrun", "accelerate"])
def test_an_error_that_would_recur_ends_the_job_after_one_attempt(data_dir, tmp_path, launcher):
    began = time.monotonic()
    proc = launched(launcher(train_args(data_dir, tmp_path, "--lr", "1e9", "--max-steps", "50"), restarts=3))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "Error: the loss is not finite" in output, output[-3000:]
    assert "would fail the same way on every restart: ending the job" in output, output[-3000:]
    assert output.count("training mnist on 2 process") == 1, output[-3000:]  # one attempt
    print(f"one attempt in {time.monotonic() - began:.1f} s")
