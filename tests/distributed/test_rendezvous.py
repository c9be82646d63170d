"""Bounded start-up: every way a run starts gives up in time, with one line, leaving no process.

Each case is started for real on loopback with a short timeout, with nothing (or the wrong
thing) on the main port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mnist_dist.distributed.rendezvous import Peers, peers_from_env, wait_for_port
from mnist_dist.errors import RendezvousError

from conftest import REPO
from slurm_cluster import free_ports

TIMEOUT = 3  # seconds of rendezvous in these tests
# Python start-up and imports (torch, accelerate) on a busy 2-core machine, plus exit.
MARGIN = 20


def run_timed(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    """Run ``cmd`` from the repository; return the finished process and its wall time."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        if env is None or key not in env:
            full_env.pop(key, None)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    return proc, time.monotonic() - start


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes that contain ``marker`` (a test's unique run directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(cmdline)
    return found


def worker_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun gives a worker of a two-process job."""
    return {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("Error: ") and "mnist-dist doctor" in lines[0], lines[0]
    assert "frame #" not in proc.stderr and "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("module", ["mnist_dist.train", "mnist_dist.evaluate"])
def test_a_worker_with_no_main_process_gives_up_in_time_with_one_line(module, tmp_path, trained_weights):
    (port,) = free_ports(1)
    args = ["--weights", str(trained_weights)] if module == "mnist_dist.evaluate" else []
    proc, seconds = run_timed(
        [
            sys.executable,
            "-m",
            module,
            *args,
            "--cpu",
            "--rendezvous-timeout",
            str(TIMEOUT),
            "--output-dir",
            str(tmp_path / "run"),
        ],
        env=worker_env(1, port),
    )
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert line.startswith("Error: rank 1 of 2 (node ")
    assert f"could not reach the main process at 127.0.0.1:{port} within {TIMEOUT} s (Connection refused)" in line
    assert "is right" in line and f"port {port} is open" in line
    assert TIMEOUT <= seconds < TIMEOUT + MARGIN, seconds
    assert processes_mentioning(str(tmp_path)) == []
    print(f"{module} rank 1 without a main process: ended after {seconds:.1f} s (timeout {TIMEOUT} s)")


def test_a_main_process_whose_other_ranks_never_come_names_how_many_arrived(tmp_path):
    (port,) = free_ports(1)
    proc, seconds = run_timed(
        [
            sys.executable,
            "-m",
            "mnist_dist.train",
            "--cpu",
            "--rendezvous-timeout",
            str(TIMEOUT),
            "--output-dir",
            str(tmp_path / "run"),
        ],
        env=worker_env(0, port),
    )
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "rank 0 of 2 (node " in line and f"waited {TIMEOUT} s at 127.0.0.1:{port} and 1 of 2 ranks arrived" in line
    assert TIMEOUT <= seconds < TIMEOUT + MARGIN, seconds
    assert processes_mentioning(str(tmp_path)) == []
    print(f"rank 0 without rank 1: ended after {seconds:.1f} s")


@pytest.mark.multiprocess
def test_two_workers_started_by_hand_meet_and_train(tmp_path, data_dir):
    (port,) = free_ports(1)
    cmd = [
        sys.executable,
        "-m",
        "mnist_dist.train",
        "--cpu",
        "--max-steps",
        "10",
        "--tracker",
        "none",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Rank 1 first: it waits for the main process, which comes a moment later.
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**env, **worker_env(rank, port)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in (1, 0)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert '"world_size": 2' in (tmp_path / "run/metrics.json").read_text()


# -- the launcher's own rendezvous, and the node-level one the job scripts run first --------


def launch_cmd(machine_rank: int, port: int, run_dir: Path) -> list[str]:
    """accelerate launch as one machine of two, as the README's multi-node command (short timeout)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate/cpu.yaml"),
        "--num_cpu_threads_per_process",
        "1",
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(machine_rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--rdzv_conf",
        f"timeout={TIMEOUT}",
        "-m",
        "mnist_dist.train",
        "--cpu",
        "--output-dir",
        str(run_dir),
    ]


def nodes_cmd(node_rank: int, port: int, addr: str = "127.0.0.1") -> list[str]:
    return [
        sys.executable,
        "-m",
        "mnist_dist.cli",
        "rendezvous",
        "--nodes",
        "2",
        "--node-rank",
        str(node_rank),
        "--main-addr",
        addr,
        "--main-port",
        str(port),
        "--timeout",
        str(TIMEOUT),
    ]


@pytest.mark.parametrize("node_rank", [1, 0])
def test_a_node_alone_gives_up_in_time_with_one_line(node_rank):
    (port,) = free_ports(1)
    proc, seconds = run_timed(nodes_cmd(node_rank, port))
    assert proc.returncode == 1
    line = one_error_line(proc)
    if node_rank == 1:
        assert "node 1 of 2 (node " in line and f"could not reach the main process at 127.0.0.1:{port}" in line
    else:
        assert f"waited {TIMEOUT} s at 127.0.0.1:{port} and 1 of 2 nodes arrived" in line
    assert TIMEOUT <= seconds < TIMEOUT + MARGIN, seconds
    print(f"node {node_rank} alone: ended after {seconds:.1f} s")


def test_nodes_meet_and_free_the_port_for_the_launcher():
    (port,) = free_ports(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            nodes_cmd(rank, port), cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for rank in (1, 0)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert f"rendezvous: all 2 nodes are up (127.0.0.1:{port}," in outputs[1][0]
    with socket.socket() as s:  # node 0's store is gone: the launcher can listen there
        s.bind(("", port))


def test_something_else_on_the_main_port_is_named_without_torch_noise():
    """A wrong address or port where another service answers (here: one that speaks HTTP)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        proc, seconds = run_timed(nodes_cmd(1, port))
    finally:
        server.close()
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert f"reached 127.0.0.1:{port}, but no main process of this run answered there within {TIMEOUT} s" in line
    assert "(torch's messages: " in line  # its retries went to the debug log, not the terminal
    log = Path(line.split("(torch's messages: ")[1].rstrip(")"))
    assert "TCPStore" in log.read_text()
    log.unlink()
    assert seconds < TIMEOUT + MARGIN


def test_the_bare_launcher_as_machine_rank_1_is_bounded_by_its_rdzv_conf(tmp_path):
    """Without the node-level step, the launcher's own rendezvous: bounded by --rdzv_conf timeout=N.

    torch's client makes a second attempt after the first times out, so it ends within about
    2-3 times N; its last line names the address and port.
    """
    (port,) = free_ports(1)
    proc, seconds = run_timed(launch_cmd(1, port, tmp_path / "run"))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith(f"(127.0.0.1, {port}).")
    assert seconds < 3 * TIMEOUT + MARGIN, seconds
    assert processes_mentioning(str(tmp_path)) == []
    print(f"bare launcher, machine rank 1 alone: ended after {seconds:.1f} s (rdzv timeout {TIMEOUT} s)")


def test_the_bare_launcher_as_machine_rank_0_names_how_many_machines_joined(tmp_path):
    (port,) = free_ports(1)
    proc, seconds = run_timed(launch_cmd(0, port, tmp_path / "run"))
    assert proc.returncode != 0
    assert "1/2 clients joined" in proc.stderr.strip().splitlines()[-1]
    assert seconds < TIMEOUT + MARGIN, seconds
    assert processes_mentioning(str(tmp_path)) == []


# -- pieces -------------------------------------------------------------------------------


def test_peers_come_from_torchrun_variables():
    assert peers_from_env({"WORLD_SIZE": "1"}) is None
    peers = peers_from_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "1234",
            "SLURMD_NODENAME": "n2",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RUN_ID": "abc",
            "TORCHELASTIC_RESTART_COUNT": "2",
        }
    )
    assert peers == Peers(3, 4, "n1", 1234, "n2", agent_store=True, scope="mnist_dist/abc/2")
    assert not peers.hosts and Peers(0, 2, "n1", 1, "n1").hosts
    with pytest.raises(RendezvousError, match="WORLD_SIZE is 2 but RANK, MASTER_PORT not set"):
        peers_from_env({"WORLD_SIZE": "2", "MASTER_ADDR": "n1"})


def test_waiting_for_a_port_ends_at_the_deadline_or_when_it_opens():
    (port,) = free_ports(1)
    start = time.monotonic()
    assert wait_for_port("127.0.0.1", port, time.monotonic() + 0.5) == "Connection refused"
    assert 0.5 <= time.monotonic() - start < 1.5
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert wait_for_port("127.0.0.1", port, time.monotonic() + 5) is None


@pytest.mark.parametrize("sig, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_the_node_wait_is_one_line_and_128_plus_the_signal(sig, status):
    """Ctrl-C (or a scheduler's SIGTERM) while node 0 waits for node 1: the line, then 130 (143), not 1."""
    import signal

    (port,) = free_ports(1)
    cmd = nodes_cmd(0, port)
    cmd[cmd.index("--timeout") + 1] = "60"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port("127.0.0.1", port, time.monotonic() + 30)  # node 0 hosts the store: it is waiting
        proc.send_signal(getattr(signal, sig))
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == status, stderr
    line = one_error_line(subprocess.CompletedProcess(cmd, proc.returncode, "", stderr))
    assert "node 0 of 2 (node " in line and f"was stopped by {sig} while waiting at 127.0.0.1:{port}" in line
    if "(torch's messages: " in line:  # the store's own notes on our probe of its port
        Path(line.split("(torch's messages: ")[1].split(")")[0]).unlink(missing_ok=True)


def test_a_node_rank_outside_the_job_is_refused_before_any_wait():
    from mnist_dist.distributed.rendezvous import wait_for_nodes

    start = time.monotonic()
    for nodes, rank in ((2, 5), (2, 2), (1, 1), (3, -1)):
        with pytest.raises(RendezvousError, match=f"node rank {rank} is not a node of {nodes}: node ranks are 0 to"):
            wait_for_nodes(nodes, rank, "127.0.0.1", 29999, timeout=60)
    assert time.monotonic() - start < 1
