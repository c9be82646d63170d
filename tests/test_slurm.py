"""The SLURM job scripts in launch/, submitted with sbatch to a real two-node cluster on this machine.

The cluster (tests/slurm_cluster.py) needs root and Debian's slurmctld, slurmd, slurm-client and
munge, which .ci/run installs; without them these tests skip and say why.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, read_metrics
from slurm_cluster import missing_reason, running_cluster

pytestmark = [pytest.mark.multiprocess, pytest.mark.slurm]

JOB_TIMEOUT = 240  # seconds; a 300-step job takes about 30 s on an idle 2-core machine


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node cluster (n1, n2), stopped with everything it started after the session."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def submit_and_wait(cluster, script: str, sbatch_args: list[str], train_args: list[str], out_dir: Path):
    """Submit launch/SCRIPT as the tests' user would; returns (job fields, job output text, seconds)."""
    env = {
        **os.environ,
        "MNIST_DIST_DIR": str(REPO),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's accelerate
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "SLURM_LABELIO": "1",  # srun --label: each line of the job's output names its task
    }
    for key in ("PROCS_PER_NODE", "LAUNCH_CONFIG", "MAIN_PORT"):
        env.pop(key, None)
    start = time.monotonic()
    job_id = cluster.submit(f"--output={out_dir}/job-%j.out", *sbatch_args, str(REPO / "launch" / script),
                            *train_args, cwd=REPO, env=env)
    job = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    output = (out_dir / f"job-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]
    return job, output, time.monotonic() - start


def train_args(data_dir: Path, run_dir: Path) -> list[str]:
    return ["--config", "configs/train/reference.yaml", "--max-steps", "300", "--tracker", "none",
            "--data-dir", str(Path(data_dir).resolve()), "--output-dir", str(run_dir)]


def test_multi_node_job_trains_on_both_nodes(slurm_cluster, data_dir, tmp_path):
    job, output, seconds = submit_and_wait(
        slurm_cluster, "multi_node.sbatch", ["--nodes=2"], train_args(data_dir, tmp_path / "run"), tmp_path
    )
    metrics = read_metrics(tmp_path / "run/metrics.json")
    assert (metrics["world_size"], metrics["steps"]) == (2, 300)
    assert metrics["test_accuracy"] > 0.90, metrics
    assert job["NodeList"] == "n[1-2]"
    assert "mnist-dist: 2 node(s) x 1 process(es), main n1:" in output
    # SLURM_LABELIO makes srun prefix each line with its task, one task per node: the main
    # process of each node (machine rank 0 on n1, 1 on n2) printed the result.
    for task in (0, 1):
        assert f"{task}: test accuracy: {100 * metrics['test_accuracy']:.2f}%" in output, output[-3000:]
    print(f"multi-node job {job['JobId']}: {seconds:.0f} s, accuracy {metrics['test_accuracy']:.4f}")


def test_single_node_job_runs_one_cpu_process(slurm_cluster, data_dir, tmp_path):
    job, output, seconds = submit_and_wait(
        slurm_cluster, "single_node.sbatch", [], train_args(data_dir, tmp_path / "run"), tmp_path
    )
    metrics = read_metrics(tmp_path / "run/metrics.json")
    assert (metrics["world_size"], metrics["steps"]) == (1, 300)
    assert metrics["test_accuracy"] > 0.90, metrics
    assert job["NumNodes"] == "1"
    assert "mnist-dist: 1 node, 1 process(es), 0 GPU(s)" in output
    print(f"single-node job {job['JobId']}: {seconds:.0f} s, accuracy {metrics['test_accuracy']:.4f}")
