"""Verdicts over the facts of several ranks: what is wrong is named, with the fix."""

import json

import pytest

from mnist_dist.config import build_config
from mnist_dist.preflight import verdicts as diagnose
from mnist_dist.preflight.facts import FAIL, OK, WARN, local_facts


@pytest.fixture
def facts(tmp_path, data_dir, monkeypatch):
    """This machine's real facts, as rank 0 of a two-node run; a test changes what it needs in rank 1."""
    for key in ("RANK", "LOCAL_RANK", "PROCS_PER_NODE", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    one = local_facts(build_config(None, {"cpu": True, "data_dir": str(data_dir), "output_dir": str(tmp_path)}))
    one["sees_token"] = True
    other = json.loads(json.dumps({**one, "rank": 1, "node": "n2"}))
    return [one, other]


def test_versions_that_differ_are_named(facts):
    assert diagnose.versions_agree(facts).status == OK
    facts[1]["versions"]["torch"] = "2.11.0"
    check = diagnose.versions_agree(facts)
    assert check.status == FAIL and check.detail.startswith("rank 1 (node n2) has torch 2.11.0, rank 0 has ")


def test_launch_shape_against_gpus_and_cpus(facts):
    gpu = {
        "uses": "cuda",
        "gpus": 2,
        "gpu_names": ["H100"] * 2,
        "bf16": True,
        "nccl": "2.21.5",
        "cpus": 32,
        "threads": 4,
    }
    for f in facts:
        f["devices"].update(gpu)
        f["procs_per_node"] = 2
    assert diagnose.launch_shape(facts).status == OK
    facts[1]["procs_per_node"] = 4
    assert diagnose.launch_shape(facts).status == FAIL
    facts[1]["procs_per_node"] = 1
    assert diagnose.launch_shape(facts).status == WARN
    facts[1]["devices"]["uses"] = "cpu"
    check = diagnose.launch_shape(facts)
    assert check.status == FAIL and "rank 1 (node n2) would train on the CPU" in check.detail


def test_oversubscribed_cpu_processes_are_a_warning(facts):
    for f in facts:
        f["devices"].update(uses="cpu", cpus=4, threads=4)
        f["procs_per_node"] = 2
    check = diagnose.launch_shape(facts)
    assert check.status == WARN and "set OMP_NUM_THREADS=2" in check.detail


def test_more_cpu_processes_than_cpus_is_named_as_the_cause(facts):
    """3 processes of 1 thread on 2 CPUs: fewer threads cannot help (it used to say: set OMP_NUM_THREADS=1)."""
    for f in facts:
        f["devices"].update(uses="cpu", cpus=2, threads=1)
        f["procs_per_node"] = 3
    check = diagnose.launch_shape(facts)
    assert check.status == WARN and "OMP_NUM_THREADS" not in check.detail
    assert check.detail.startswith(
        f"node {facts[0]['node']}: 3 CPU processes on 2 CPU(s) is oversubscribed (more processes than CPUs, "
        "slower); launch at most 2 per node (--num_processes, PROCS_PER_NODE)"
    )


def test_a_run_directory_not_shared_between_nodes_is_named(facts):
    shared, disk = diagnose.run_directory(facts, "runs/x")
    assert (shared.status, disk.status) == (OK, OK) and "the same on all 2 nodes" in shared.detail
    facts[1]["sees_token"] = False
    shared, _ = diagnose.run_directory(facts, "runs/x")
    assert shared.status == FAIL and shared.detail.startswith("rank 1 (node n2) does not see the file rank 0 wrote")
    facts[1]["run_dir"]["free_bytes"] = 1000
    assert diagnose.run_directory(facts, "runs/x")[1].status == FAIL


def test_slurm_allocation_against_the_nodes_in_use(facts):
    for i, f in enumerate(facts):
        f["slurm"] = {
            "job_id": "7",
            "nnodes": "2",
            "ntasks": "2",
            "nodeid": str(i),
            "gpus_on_node": None,
            "cpus_per_task": None,
            "cpus_on_node": "1",
            "job_nodelist": "n[1-2]",
            "restart_count": None,
        }
    assert diagnose.slurm_allocation(facts).status == OK
    facts[0]["slurm"]["nnodes"] = facts[1]["slurm"]["nnodes"] = "3"
    check = diagnose.slurm_allocation(facts)
    assert check.status == FAIL and "job 7 has 3 node(s), the processes run on 2" in check.detail
