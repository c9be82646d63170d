"""The launch scripts and multi-machine launch, run for real on this machine (no SLURM here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_metrics

pytestmark = pytest.mark.multiprocess


def test_single_node_script_runs_cpu_processes_without_slurm(tmp_path, data_dir):
    proc = run_single_node_script(
        launch_env(tmp_path, PROCS_PER_NODE="2"), data_dir, tmp_path / "run", "--max-steps", "20"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run/metrics.json")
    assert (metrics["world_size"], metrics["steps"], metrics["device"]) == (2, 20, "cpu")


def test_two_machines_with_their_own_machine_rank(tmp_path, data_dir):
    """What multi_node.sbatch runs on each node, with both 'nodes' on this machine."""
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "configs/accelerate/cpu.yaml"),
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            "29617",
            "-m",
            "mnist_dist.train",
            "--cpu",
            "--max-steps",
            "20",
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(tmp_path / "run"),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert read_metrics(tmp_path / "run/metrics.json")["world_size"] == 2


def test_multi_node_script_reads_the_machine_rank_on_each_node():
    text = (REPO / "launch/multi_node.sbatch").read_text()
    # Expanded by bash -c on the node, not by the batch shell on the first node.
    assert "bash -c '" in text and '--machine_rank "$SLURM_NODEID"' in text
    result = subprocess.run(["bash", "-n", str(REPO / "launch/multi_node.sbatch")], capture_output=True)
    assert result.returncode == 0


# -- launch/_common.sh: what it chooses, run for real with a fake nvidia-smi on PATH -------------

NVIDIA_SMI = {
    "fails": 'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9',
    "no devices": 'echo "No devices were found"; exit 6',
    "no devices, status 0": 'echo "No devices were found"',
    "two GPUs": 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"; echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)"',
}
CHOICES = ("GPUS", "PROCS_PER_NODE", "LAUNCH_CONFIG", "MAIN_PORT", "OMP_NUM_THREADS", "RENDEZVOUS_TIMEOUT")


def launch_env(tmp_path: Path, nvidia_smi: str | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for the scripts (no SLURM, no GPU variables), with a fake nvidia-smi first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/bash\n{nvidia_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_")
        and k
        not in (
            "CUDA_VISIBLE_DEVICES",
            "OMP_NUM_THREADS",
            "PROCS_PER_NODE",
            "MAIN_PORT",
            "MAIN_ADDR",
            "LAUNCH_CONFIG",
            "VIRTUAL_ENV",
        )
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        MNIST_DIST_DIR=str(REPO),
        **extra,
    )
    return env


def run_single_node_script(env: dict[str, str], data_dir, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """launch/single_node.sbatch run with bash outside SLURM, as on a workstation."""
    script = [str(REPO / "launch/single_node.sbatch"), *args, "--data-dir", str(data_dir), "--output-dir", str(run_dir)]
    return subprocess.run(["bash", *script], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def source_common(env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Source _common.sh under `set -euo pipefail` as the job scripts do; return what it chose."""
    script = (
        "source launch/_common.sh; for v in " + " ".join(CHOICES) + '; do echo "$v=${!v}"; done; '
        'echo "DEVICE_ARGS=${DEVICE_ARGS[*]-}"'
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    return proc, dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize("case", ["fails", "no devices", "no devices, status 0"])
def test_an_nvidia_smi_without_gpus_means_cpu_processes_and_says_so(tmp_path, case):
    proc, chose = source_common(launch_env(tmp_path, NVIDIA_SMI[case]))
    assert proc.returncode == 0, proc.stderr
    assert (chose["GPUS"], chose["PROCS_PER_NODE"], chose["DEVICE_ARGS"]) == ("0", "1", "--cpu")
    assert chose["LAUNCH_CONFIG"] == "configs/accelerate/cpu.yaml"
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mnist-dist: nvidia-smi") and line.endswith("using CPU processes")
    assert ("NVIDIA-SMI has failed" if case == "fails" else "No devices were found") in line


def test_gpus_come_from_slurm_then_cuda_visible_devices_then_nvidia_smi(tmp_path):
    chose = source_common(launch_env(tmp_path, NVIDIA_SMI["two GPUs"]))[1]
    assert (chose["GPUS"], chose["PROCS_PER_NODE"], chose["LAUNCH_CONFIG"], chose["DEVICE_ARGS"]) == (
        "2",
        "2",
        "configs/accelerate/multi_gpu.yaml",
        "",
    )
    assert source_common(launch_env(tmp_path, NVIDIA_SMI["fails"], CUDA_VISIBLE_DEVICES="0,1,3"))[1]["GPUS"] == "3"
    assert source_common(launch_env(tmp_path, NVIDIA_SMI["two GPUs"], CUDA_VISIBLE_DEVICES=""))[1]["GPUS"] == "0"
    assert source_common(launch_env(tmp_path, NVIDIA_SMI["fails"], SLURM_GPUS_ON_NODE="4"))[1]["GPUS"] == "4"
    assert source_common(launch_env(tmp_path))[1]["GPUS"] == "0"  # no nvidia-smi at all: quietly none


def test_the_main_port_is_per_job_and_below_the_ephemeral_range(tmp_path):
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [
        int(source_common(launch_env(tmp_path, SLURM_JOB_ID=str(job)))[1]["MAIN_PORT"]) for job in (1, 2, 3, 999_999)
    ]
    assert len(set(ports)) == 4 and all(1024 < p < low for p in ports), (ports, low)
    assert ports[:3] == [ports[0], ports[0] + 1, ports[0] + 2]  # consecutive jobs never share one
    assert source_common(launch_env(tmp_path, SLURM_JOB_ID="5", MAIN_PORT="4321"))[1]["MAIN_PORT"] == "4321"


@pytest.mark.parametrize("cpus, procs, threads", [("8", "4", "2"), ("3", "4", "1"), ("32", "1", "32")])
def test_threads_per_process_divide_the_task_cpus_among_the_node_processes(tmp_path, cpus, procs, threads):
    chose = source_common(launch_env(tmp_path, SLURM_CPUS_PER_TASK=cpus, PROCS_PER_NODE=procs))[1]
    assert chose["OMP_NUM_THREADS"] == threads
    told = source_common(launch_env(tmp_path, SLURM_CPUS_PER_TASK=cpus, OMP_NUM_THREADS="5"))[1]
    assert told["OMP_NUM_THREADS"] == "5"


def test_arrays_that_may_be_empty_are_expanded_safely_for_old_bash():
    """bash < 4.4 calls an empty "${A[@]}" unbound under set -u; the guard ${A[@]+"${A[@]}"} works in all."""
    import re

    for script in sorted((REPO / "launch").iterdir()):
        text = script.read_text()
        for name in re.findall(r'"\$\{(\w+)\[@\]\}"', text):
            assert f'${{{name}[@]+"${{{name}[@]}}"}}' in text, f'{script.name}: unguarded "${{{name}[@]}}"'


@pytest.mark.multiprocess
def test_the_gpu_path_with_empty_device_args_runs_under_set_u(tmp_path, data_dir):
    """nvidia-smi lists two GPUs (this machine has none): DEVICE_ARGS and JOB_STEP are empty, and the
    script still launches two processes, which train on the CPU since CUDA is not there."""
    env = launch_env(tmp_path, NVIDIA_SMI["two GPUs"], OMP_NUM_THREADS="1")
    proc = run_single_node_script(env, data_dir, tmp_path / "run", "--max-steps", "10", "--tracker", "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mnist-dist: 1 node, 2 process(es), 2 GPU(s)" in proc.stdout
    assert read_metrics(tmp_path / "run/metrics.json")["world_size"] == 2
