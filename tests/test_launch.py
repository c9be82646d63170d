"""The launch scripts and multi-machine launch, run for real on this machine (no SLURM here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_metrics

pytestmark = pytest.mark.multiprocess


def test_single_node_script_runs_cpu_processes_without_slurm(tmp_path, data_dir):
    env = {**os.environ, "PROCS_PER_NODE": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(
        ["bash", str(REPO / "launch/single_node.sbatch"), "--max-steps", "20", "--data-dir", str(data_dir),
         "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run/metrics.json")
    assert (metrics["world_size"], metrics["steps"], metrics["device"]) == (2, 20, "cpu")


def test_two_machines_with_their_own_machine_rank(tmp_path, data_dir):
    """What multi_node.sbatch runs on each node, with both 'nodes' on this machine."""
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/cpu.yaml"), "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", "29617",
               "-m", "mnist_dist.train", "--cpu", "--max-steps", "20", "--data-dir", str(data_dir),
               "--output-dir", str(tmp_path / "run")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert read_metrics(tmp_path / "run/metrics.json")["world_size"] == 2


def test_multi_node_script_reads_the_machine_rank_on_each_node():
    text = (REPO / "launch/multi_node.sbatch").read_text()
    # Expanded by bash -c on the node, not by the batch shell on the first node.
    assert "bash -c '" in text and '--machine_rank "$SLURM_NODEID"' in text
    result = subprocess.run(["bash", "-n", str(REPO / "launch/multi_node.sbatch")], capture_output=True)
    assert result.returncode == 0
