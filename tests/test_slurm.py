"""The SLURM job scripts in launch/, submitted with sbatch to a real two-node cluster on this machine.

The cluster (tests/slurm_cluster.py) needs root and Debian's slurmctld, slurmd, slurm-client and
munge, which .ci/run installs; without them these tests skip and say why (under CI=true, fail).
The cluster itself is the session fixture ``slurm_cluster`` (conftest.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from mnist_dist.runs import load_weights

from conftest import REPO, assert_continues, read_metrics
from slurm_cluster import wait_until

pytestmark = [pytest.mark.multiprocess, pytest.mark.slurm]

JOB_TIMEOUT = 240  # seconds; a 1500-step job takes about 30 s on an idle 2-core machine
STEPS = 1500


def job_env() -> dict[str, str]:
    env = {
        **os.environ,
        "MNIST_DIST_DIR": str(REPO),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's accelerate
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "SLURM_LABELIO": "1",  # srun --label: each line of the job's output names its task
    }
    for key in ("PROCS_PER_NODE", "LAUNCH_CONFIG", "MAIN_ADDR", "MAIN_PORT", "RENDEZVOUS_TIMEOUT"):
        env.pop(key, None)
    return env


def submit(cluster, script: str, sbatch_args: list[str], train_args: list[str], out_dir: Path) -> tuple[int, Path]:
    """Submit launch/SCRIPT as the tests' user would; returns the job id and its output file."""
    job_id = cluster.submit(
        f"--output={out_dir}/job-%j.out",
        *sbatch_args,
        str(REPO / "launch" / script),
        *train_args,
        cwd=REPO,
        env=job_env(),
    )
    return job_id, out_dir / f"job-{job_id}.out"


def wait_completed(cluster, job_id: int, output_file: Path) -> tuple[dict[str, str], str]:
    job = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    output = output_file.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]
    return job, output


def submit_and_wait(cluster, script: str, sbatch_args: list[str], train_args: list[str], out_dir: Path):
    """Submit and wait for the job to complete; returns (job fields, job output text, seconds)."""
    start = time.monotonic()
    job_id, output_file = submit(cluster, script, sbatch_args, train_args, out_dir)
    job, output = wait_completed(cluster, job_id, output_file)
    return job, output, time.monotonic() - start


def train_args(data_dir: Path, run_dir: Path) -> list[str]:
    # Log (and so agree on a stop) every 7 steps; long enough to be signalled while training.
    return [
        "--config",
        "configs/train/reference.yaml",
        "--max-steps",
        str(STEPS),
        "--log-every",
        "7",
        "--tracker",
        "none",
        "--data-dir",
        str(Path(data_dir).resolve()),
        "--output-dir",
        str(run_dir),
    ]


def submit_training_on_two_nodes(cluster, data_dir, run_dir: Path, out_dir: Path) -> tuple[int, Path]:
    """Submit multi_node.sbatch on both nodes and return once it trains: (job id, output file)."""
    job_id, output_file = submit(cluster, "multi_node.sbatch", ["--nodes=2"], train_args(data_dir, run_dir), out_dir)
    wait_until(
        lambda: output_file.exists() and "samples/s" in output_file.read_text(),
        JOB_TIMEOUT,
        "the job to start training",
    )
    return job_id, output_file


def wait_requeued(cluster, job_id: int) -> None:
    """Wait until the job is back in the queue after a requeue."""

    def requeued() -> bool:
        out = cluster.run("scontrol", "--oneliner", "show", "job", str(job_id)).stdout
        return "Restarts=1" in out and "JobState=PENDING" in out

    wait_until(requeued, 120, "the job to be requeued")


@pytest.fixture(scope="module")
def multi_node_run(slurm_cluster, data_dir, tmp_path_factory):
    """An uninterrupted multi_node.sbatch job on both nodes: (job fields, output, run directory)."""
    out = tmp_path_factory.mktemp("multi_node")
    job, output, seconds = submit_and_wait(
        slurm_cluster, "multi_node.sbatch", ["--nodes=2"], train_args(data_dir, out / "run"), out
    )
    print(f"multi-node job {job['JobId']}: {seconds:.0f} s")
    return job, output, out / "run"


def test_multi_node_job_trains_on_both_nodes(multi_node_run):
    job, output, run_dir = multi_node_run
    metrics = read_metrics(run_dir / "metrics.json")
    assert (metrics["world_size"], metrics["steps"]) == (2, STEPS)
    assert metrics["test_accuracy"] > 0.95, metrics
    assert job["NodeList"] == "n[1-2]"
    assert "mnist-dist: 2 node(s) x 1 process(es), main n1:" in output
    # SLURM_LABELIO makes srun prefix each line with its task, one task per node: the main
    # process of each node (machine rank 0 on n1, 1 on n2) printed the result.
    for task in (0, 1):
        assert f"{task}: test accuracy: {100 * metrics['test_accuracy']:.2f}%" in output, output[-3000:]
    print(f"multi-node job {job['JobId']}: accuracy {metrics['test_accuracy']:.4f}")


def test_signalled_job_requeues_resumes_and_ends_as_if_never_stopped(slurm_cluster, multi_node_run, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    job_id, output_file = submit_training_on_two_nodes(slurm_cluster, data_dir, run_dir, tmp_path)
    # What SLURM sends before the time limit (#SBATCH --signal=USR1@120), now.
    slurm_cluster.run("scancel", "--signal=USR1", str(job_id))
    wait_requeued(slurm_cluster, job_id)
    # SLURM holds a requeued job for about two minutes (its BeginTime); let it start now.
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job, output = wait_completed(slurm_cluster, job_id, output_file)

    assert job["Restarts"] == "1"
    assert "0: stopped by SIGUSR1 at step" in output, output[-3000:]
    assert f"SLURM job {job_id} requeued" in output
    assert "(restart 1: resuming from the newest checkpoint)" in output
    assert "resumed from " in output
    stopped_at = int(output.split("0: stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert 0 < stopped_at < STEPS
    metrics = read_metrics(run_dir / "metrics.json")
    assert (metrics["world_size"], metrics["steps"]) == (2, STEPS)
    straight = load_weights(multi_node_run[2] / "model.safetensors")
    resumed = load_weights(run_dir / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    print(f"job {job_id}: signalled, stopped at step {stopped_at}, requeued, resumed; weights bit-identical")


def launcher_of_node(cluster, node_id: int) -> int:
    """The pid of the `accelerate launch` process that a job step runs on node ``node_id``."""
    from slurm_cluster import processes_using

    for pid in processes_using(cluster.conf):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "launch" in argv and "--machine_rank" in argv and argv[argv.index("--machine_rank") + 1] == str(node_id):
            return pid
    raise AssertionError(f"no launcher found for node {node_id}")


def test_launcher_alone_signalled_then_requeued_onto_fewer_nodes(slurm_cluster, multi_node_run, data_dir, tmp_path):
    """SIGUSR1 reaches only the second node's launcher (as where SLURM does not signal every process):
    it passes it to its rank, all ranks agree to stop, the job requeues; it then runs on one node."""
    import signal

    run_dir = tmp_path / "run"
    job_id, output_file = submit_training_on_two_nodes(slurm_cluster, data_dir, run_dir, tmp_path)
    os.kill(launcher_of_node(slurm_cluster, 1), signal.SIGUSR1)
    wait_requeued(slurm_cluster, job_id)
    # A node is lost meanwhile; the requeued job is let run on fewer nodes (1 to 2 of them).
    slurm_cluster.run("scontrol", "update", "NodeName=n2", "State=DRAIN", "Reason=lost")
    try:
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1", "NumCPUs=1")
        slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        job, output = wait_completed(slurm_cluster, job_id, output_file)
    finally:
        slurm_cluster.run("scontrol", "update", "NodeName=n2", "State=RESUME")

    assert (job["Restarts"], job["NumNodes"]) == ("1", "1")
    assert "0: stopped by SIGUSR1 at step" in output, output[-3000:]
    stopped_at = int(output.split("0: stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert "written by 2 process(es), continuing on 1" in output, output[-3000:]
    metrics = read_metrics(run_dir / "metrics.json")
    assert (metrics["world_size"], metrics["steps"]) == (1, STEPS)
    gap, accuracy_gap = assert_continues(run_dir, multi_node_run[2], stopped_at)
    print(
        f"job {job_id}: node 2's launcher signalled, stopped at step {stopped_at}, requeued onto 1 node; "
        f"weights within {gap:.1e} of the 2-node run, test correct differs by {accuracy_gap}"
    )


def test_single_node_job_runs_one_cpu_process(slurm_cluster, data_dir, tmp_path):
    args = train_args(data_dir, tmp_path / "run")
    args[args.index("--max-steps") + 1] = "300"
    job, output, seconds = submit_and_wait(slurm_cluster, "single_node.sbatch", [], args, tmp_path)
    metrics = read_metrics(tmp_path / "run/metrics.json")
    assert (metrics["world_size"], metrics["steps"]) == (1, 300)
    assert metrics["test_accuracy"] > 0.90, metrics
    assert job["NumNodes"] == "1"
    assert "mnist-dist: 1 node, 1 process(es), 0 GPU(s)" in output
    print(f"single-node job {job['JobId']}: {seconds:.0f} s, accuracy {metrics['test_accuracy']:.4f}")


def job_processes(job_id: int) -> list[int]:
    """Pids of live processes that belong to SLURM job ``job_id`` (their environment says so)."""
    marker = f"SLURM_JOB_ID={job_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


# What the second node's launcher does instead of joining, in a `python` put first on the
# job's PATH (the srun task execs it): it is killed once the first node waits for it (the
# main port answers), or it hangs.
NEVER_JOINS = {
    "killed": "for i in $(seq 300); do (exec 3<>/dev/tcp/$MAIN_ADDR/$MAIN_PORT) 2>/dev/null && break; sleep 0.2; done; "
    "kill -KILL $$",
    "hung": "exec sleep 600",
}


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_second_node_that_never_joins_ends_the_job_in_time_with_one_line(slurm_cluster, data_dir, tmp_path, how):
    timeout = 15
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        f'#!/bin/bash\nif [ "$SLURM_NODEID" = 1 ]; then {NEVER_JOINS[how]}; fi\nexec {sys.executable} "$@"\n'
    )
    (bin_dir / "python").chmod(0o755)
    env = job_env()
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=sys.prefix, RENDEZVOUS_TIMEOUT=str(timeout))
    start = time.monotonic()
    job_id = slurm_cluster.submit(
        f"--output={tmp_path}/job-%j.out",
        "--nodes=2",
        str(REPO / "launch/multi_node.sbatch"),
        *train_args(data_dir, tmp_path / "run"),
        cwd=REPO,
        env=env,
    )
    job = slurm_cluster.wait(job_id, timeout=timeout + 90)
    seconds = time.monotonic() - start
    output = (tmp_path / f"job-{job_id}.out").read_text()
    assert job["JobState"] == "FAILED", output[-3000:]
    ours = [line for line in output.splitlines() if line.startswith("0: Error: node 0 of 2 (node n1)")]
    assert len(ours) == 1, output[-3000:]
    if how == "killed":  # SLURM ends the job step (srun --kill-on-bad-exit) as soon as the node died
        assert "was stopped by SIGTERM while waiting at n1:" in ours[0] and "(1 of 2 nodes in)" in ours[0]
    else:
        assert f"waited {timeout} s at n1:" in ours[0] and "and 1 of 2 nodes arrived" in ours[0]
        assert seconds >= timeout
    assert seconds < timeout + 60
    assert "frame #" not in output and "Traceback" not in output
    wait_until(lambda: job_processes(job_id) == [], 30, f"the processes of job {job_id} to end")
    print(f"second node {how} before joining: job {job_id} ended after {seconds:.0f} s (timeout {timeout} s)")
