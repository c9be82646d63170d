"""mnist-dist doctor: run for real on one process, under accelerate launch, and on the two-node
SLURM cluster, healthy and with each failure it must name."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnist_dist.config import build_config

from conftest import REPO, run_cli
from slurm_cluster import free_ports

CHECKS = [
    "versions",
    "devices",
    "launch shape",
    "slurm",
    "rendezvous",
    "collectives",
    "run directory",
    "disk",
    "data",
    "batch",
    "resume",
    "wandb",
]


def rows(output: str) -> dict[str, tuple[str, str]]:
    """The doctor's table: check name -> (result, detail)."""
    table = {}
    for line in output.splitlines():
        for name in CHECKS:
            if line.startswith(name + " ") and line[len(name) :].split()[0] in ("OK", "WARN", "FAIL"):
                result, detail = line[len(name) :].strip().split(None, 1)
                table[name] = (result, detail)
    return table


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "doctor.json").read_text())


def test_one_process_passes_with_a_table_and_a_report(tmp_path, data_dir):
    proc = run_cli(["mnist_dist.doctor", "--cpu", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert list(table) == CHECKS and all(r == "OK" for r, _ in table.values()), proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == f"all checks passed; report: {tmp_path / 'run' / 'doctor.json'}"
    body = report(tmp_path / "run")
    assert body["ok"] and body["failed"] == [] and [c["name"] for c in body["checks"]] == CHECKS
    assert body["ranks"][0]["data"]["missing"] == [] and body["ranks"][0]["run_dir"]["writable"]


@pytest.mark.multiprocess
def test_two_processes_exchange_and_measure_the_all_reduce(tmp_path, data_dir):
    proc = run_cli(
        ["mnist_dist.doctor", "--cpu", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run")], processes=2
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert table["rendezvous"][1].startswith("2 of 2 ranks met at 127.0.0.1:")
    assert table["collectives"][1].startswith("all-reduce and all-gather correct (gloo)")
    figures = report(tmp_path / "run")["collectives"]
    assert figures["world_size"] == 2 and figures["gradient_floats"] == 784 * 256 + 256 + 256 * 10 + 10
    assert 0 < figures["latency_ms"] < figures["allreduce_ms"] and figures["bus_gb_per_s"] > 0
    assert figures["estimated_speedup"] > 0
    assert len(report(tmp_path / "run")["ranks"]) == 2
    print("doctor, 2 CPU processes:", table["collectives"][1])


@pytest.mark.multiprocess
def test_a_launch_that_training_refuses_never_passes(tmp_path, data_dir):
    """3 processes with batch 64: the doctor said "all checks passed", then training refused the split.
    Its oversubscription warning said "set OMP_NUM_THREADS=1" when it was 1 already."""
    import os

    run = tmp_path / "run"
    args = ["mnist_dist.doctor", "--cpu", "--tracker", "none", "--data-dir", str(data_dir), "--output-dir", str(run)]
    proc = run_cli(args, processes=3, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = rows(proc.stdout)
    assert table["batch"] == (
        "FAIL",
        "config key 'batch_size' (64) must be divisible by the number of processes (3) in batch_mode 'global'; "
        "use a multiple of 3 or batch_mode: per_device",
    )
    assert "all checks passed" not in proc.stdout and "1 check(s) failed (batch)" in proc.stdout
    assert report(run)["failed"] == ["batch"] and table["resume"] == ("OK", f"fresh start in {run} (resume: auto)")
    result, detail = table["launch shape"]
    assert "OMP_NUM_THREADS=1" not in detail
    if len(os.sched_getaffinity(0)) < 3:
        assert result == "WARN" and "3 CPU processes on" in detail and "(more processes than CPUs, slower)" in detail


def test_missing_data_is_named_with_the_fetch_command(tmp_path):
    proc = run_cli(
        ["mnist_dist.doctor", "--cpu", "--data-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "run")]
    )
    assert proc.returncode == 1
    result, detail = rows(proc.stdout)["data"]
    assert result == "FAIL" and "mnist is missing in" in detail
    assert f"mnist-dist data download --dataset mnist --data-dir {tmp_path / 'none'}" in detail
    assert report(tmp_path / "run")["failed"] == ["data"]
    assert "1 check(s) failed (data): training would fail or hang" in proc.stdout


def test_a_rank_that_cannot_reach_the_main_process_fails_in_time_with_one_line(tmp_path):
    (port,) = free_ports(1)
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.monotonic()
    proc = run_cli(["mnist_dist.doctor", "--cpu", "--rendezvous-timeout", "3", "--output-dir", str(tmp_path)], env=env)
    seconds = time.monotonic() - start
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("Error: rank 1 of 2") and f"127.0.0.1:{port} within 3 s" in line
    assert seconds < 3 + 20


def test_a_main_process_alone_reports_how_many_ranks_arrived(tmp_path, data_dir):
    (port,) = free_ports(1)
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = run_cli(
        [
            "mnist_dist.doctor",
            "--cpu",
            "--rendezvous-timeout",
            "3",
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(tmp_path),
        ],
        env=env,
    )
    assert proc.returncode == 1
    result, detail = rows(proc.stdout)["rendezvous"]
    assert result == "FAIL" and f"waited 3 s at 127.0.0.1:{port} and 1 of 2 ranks arrived" in detail
    assert report(tmp_path)["failed"] == ["rendezvous"]


def test_the_doctor_waits_a_minute_unless_told_otherwise():
    from mnist_dist.preflight.doctor import DOCTOR_TIMEOUT, doctor_timeout

    assert doctor_timeout(build_config(None, {})) == DOCTOR_TIMEOUT == 60
    assert doctor_timeout(build_config(None, {"rendezvous_timeout": 5})) == 5


def test_the_batch_is_checked_for_the_processes_training_will_start(monkeypatch):
    """Not the doctor's own processes: launch/doctor.sbatch runs one per node for PROCS_PER_NODE of training."""
    from mnist_dist.preflight.doctor import _training_world

    def ranks(nodes: int, per_node: int, doctors_per_node: int) -> list[dict]:
        doctors = range(nodes * doctors_per_node)
        return [{"node": f"n{i // doctors_per_node}", "procs_per_node": per_node} for i in doctors]

    assert _training_world(ranks(1, 3, 3), 3) == 3  # accelerate launch --num_processes 3 -m mnist_dist.doctor
    assert _training_world(ranks(2, 4, 1), 2) == 8  # sbatch --nodes=2 launch/doctor.sbatch, PROCS_PER_NODE=4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert _training_world(ranks(1, 4, 1), 2) == 8  # rank 0 alone: the other node never came
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert _training_world(ranks(1, 1, 1), 1) == 1


def test_the_cli_loads_the_doctor_only_when_it_runs():
    code = (
        "import sys, mnist_dist.cli; "
        "print('mnist_dist.preflight.doctor' in sys.modules, 'mnist_dist.preflight.verdicts' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout
    assert out.split() == ["False", "False"]


# -- verdicts over the facts of several ranks ----------------------------------------------


# -- on the two-node SLURM cluster --------------------------------------------------------


def doctor_job(cluster, tmp_path: Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    """Submit launch/doctor.sbatch on both nodes; return (job fields, output, seconds)."""
    from test_slurm import job_env

    start = time.monotonic()
    job_id = cluster.submit(
        f"--output={tmp_path}/doctor-%j.out",
        "--nodes=2",
        str(REPO / "launch/doctor.sbatch"),
        *args,
        cwd=REPO,
        env={**job_env(), **(env or {})},
    )
    job = cluster.wait(job_id, timeout=timeout)
    return job, (tmp_path / f"doctor-{job_id}.out").read_text(), time.monotonic() - start


def node0_rows(output: str) -> dict[str, tuple[str, str]]:
    return rows("\n".join(line[3:] for line in output.splitlines() if line.startswith("0: ")))


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_a_healthy_allocation_passes(slurm_cluster, data_dir, tmp_path):
    job, output, seconds = doctor_job(
        slurm_cluster, tmp_path, ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run")]
    )
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]
    table = node0_rows(output)
    assert list(table) == CHECKS and all(r == "OK" for r, _ in table.values()), output[-3000:]
    assert table["rendezvous"][1].startswith("2 of 2 ranks met at n1:")
    assert table["run directory"][1].endswith("the same on all 2 nodes")
    assert table["slurm"][1].startswith(f"job {job['JobId']}: 2 node(s) (n[1-2]), node ids 0,1")
    assert report(tmp_path / "run")["ok"]
    print(f"doctor on 2 SLURM nodes: passed in {seconds:.0f} s; {table['collectives'][1]}")


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_a_run_directory_each_node_sees_differently_is_named(slurm_cluster, data_dir, tmp_path):
    if slurm_cluster.node_local is None:
        pytest.skip("no mount namespaces here: the nodes cannot have a directory of their own")
    run_dir = slurm_cluster.node_local / tmp_path.name
    job, output, seconds = doctor_job(
        slurm_cluster, tmp_path, ["--data-dir", str(data_dir), "--output-dir", str(run_dir)]
    )
    assert job["JobState"] == "FAILED"
    result, detail = node0_rows(output)["run directory"]
    assert result == "FAIL" and detail.startswith(f"rank 1 (node n2) does not see the file rank 0 wrote in {run_dir}")
    assert "0: 1 check(s) failed (run directory)" in output
    assert seconds < 120


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_a_wrong_main_address_is_named_in_bounded_time(slurm_cluster, data_dir, tmp_path):
    address = "198.51.100.1"  # TEST-NET-2: no main process of ours is ever there
    job, output, seconds = doctor_job(
        slurm_cluster,
        tmp_path,
        ["--rendezvous-timeout", "5", "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run")],
        env={"MAIN_ADDR": address},
    )
    assert job["JobState"] == "FAILED"
    node1 = [line for line in output.splitlines() if line.startswith("1: Error: rank 1 of 2 (node n2)")]
    assert len(node1) == 1 and f"{address}:" in node1[0], output[-3000:]
    result, detail = node0_rows(output)["rendezvous"]
    assert result == "FAIL" and f"waited 5 s at {address}:" in detail and "1 of 2 ranks arrived" in detail
    assert "frame #" not in output and "Traceback" not in output
    assert seconds < 5 + 60
    for piece in output.split("(torch's messages: ")[1:]:  # the debug logs, on this machine
        Path(piece.split(")")[0]).unlink(missing_ok=True)
    print(f"wrong main address: named by both nodes, job ended after {seconds:.0f} s")


@pytest.mark.slurm
@pytest.mark.multiprocess
def test_missing_data_on_the_nodes_is_named(slurm_cluster, tmp_path):
    job, output, _ = doctor_job(
        slurm_cluster, tmp_path, ["--data-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "run")]
    )
    assert job["JobState"] == "FAILED"
    result, detail = node0_rows(output)["data"]
    assert result == "FAIL" and "mnist is missing in" in detail and "mnist-dist data download" in detail
    assert report(tmp_path / "run")["failed"] == ["data"]
