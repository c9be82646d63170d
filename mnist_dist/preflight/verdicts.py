"""Verdicts of ``mnist-dist doctor`` over the facts of every rank (the collectives: collectives.py).

Each function takes the gathered facts (one dict per rank, from ``facts.local_facts``)
and returns a ``Check`` whose detail, when it is not ok, says what is wrong and the fix.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .facts import FAIL, MIN_FREE_BYTES, OK, WARN, Check


def _where(f: dict[str, Any]) -> str:
    return f"rank {f['rank']} (node {f['node']})"


def _by_node(facts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    nodes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in facts:
        nodes[f["node"]].append(f)
    return dict(nodes)


def versions_agree(facts: list[dict[str, Any]]) -> Check:
    """The same python and packages on every rank (different ones can hang a collective or differ silently)."""
    ref = facts[0]["versions"]
    summary = ", ".join(f"{k} {v}" for k, v in ref.items())
    diff = [(f, k) for f in facts[1:] for k in ref if f["versions"].get(k) != ref[k]]
    if not diff:
        return Check("versions", OK, summary + (" on every rank" if len(facts) > 1 else ""))
    f, k = diff[0]
    return Check(
        "versions",
        FAIL,
        f"{_where(f)} has {k} {f['versions'].get(k)}, rank 0 has {ref[k]} "
        f"({len(diff)} difference(s)); install the same versions on every node",
    )


def devices_seen(facts: list[dict[str, Any]]) -> Check:
    """What each node has: GPUs (names, bf16, NCCL) or CPUs. Facts only; ``launch_shape`` judges them."""
    parts = []
    for node, fs in _by_node(facts).items():
        d = fs[0]["devices"]
        if d["gpus"]:
            names = ", ".join(sorted(set(d["gpu_names"])))
            parts.append(f"{node}: {d['gpus']} x {names} (bf16 {'yes' if d['bf16'] else 'no'}, NCCL {d['nccl']})")
        else:
            parts.append(f"{node}: no GPU, {d['cpus']} CPU(s)")
    return Check("devices", OK, "; ".join(parts))


def launch_shape(facts: list[dict[str, Any]]) -> Check:
    """Processes per node against the node's GPUs (or CPUs); every rank on the same kind of device."""
    kinds = {f["devices"]["uses"] for f in facts}
    if len(kinds) > 1:
        cpu_rank = next(f for f in facts if f["devices"]["uses"] == "cpu")
        return Check(
            "launch shape",
            FAIL,
            f"{_where(cpu_rank)} would train on the CPU while others use GPUs (they "
            "would not find each other); give every node GPUs, or pass --cpu",
        )
    warnings, parts = [], []
    for node, fs in _by_node(facts).items():
        d, procs = fs[0]["devices"], max(f["procs_per_node"] for f in fs)
        if d["uses"] == "cuda":
            parts.append(f"{node}: {procs} process(es) for {d['gpus']} GPU(s)")
            if procs > d["gpus"]:
                return Check(
                    "launch shape",
                    FAIL,
                    f"node {node}: {procs} processes for {d['gpus']} GPU(s) would "
                    f"share a GPU; launch {d['gpus']} per node (PROCS_PER_NODE, "
                    "--num_processes)",
                )
            if procs < d["gpus"]:
                warnings.append(
                    f"node {node} uses {procs} of its {d['gpus']} GPUs; launch {d['gpus']} processes "
                    "per node (PROCS_PER_NODE, --num_processes) to use them all"
                )
        else:
            parts.append(f"{node}: {procs} CPU process(es) x {d['threads']} thread(s) on {d['cpus']} CPU(s)")
            if warning := _cpu_oversubscribed(node, procs, d):
                warnings.append(warning)
    if warnings:
        return Check("launch shape", WARN, "; ".join(warnings))
    return Check("launch shape", OK, "; ".join(parts))


def _cpu_oversubscribed(node: str, procs: int, d: dict[str, Any]) -> str | None:
    """Why CPU processes on a node would share its CPUs (slower), named by its real cause, and the fix."""
    cpus, threads = d["cpus"], d["threads"]
    if procs > cpus:  # fewer threads cannot help: there are more processes than CPUs
        return (
            f"node {node}: {procs} CPU processes on {cpus} CPU(s) is oversubscribed (more processes than "
            f"CPUs, slower); launch at most {cpus} per node (--num_processes, PROCS_PER_NODE)"
        )
    if procs * threads > cpus:
        return (
            f"node {node}: {procs} process(es) x {threads} threads on {cpus} CPUs is "
            f"oversubscribed (slower); set OMP_NUM_THREADS={max(1, cpus // procs)}"
        )
    return None


def slurm_allocation(facts: list[dict[str, Any]]) -> Check:
    """The allocation every node sees against where the processes run."""
    s0 = facts[0]["slurm"]
    if s0 is None:
        return Check("slurm", OK, "not in a SLURM job")
    nodes = sorted({f["node"] for f in facts})
    jobs = {f["slurm"]["job_id"] for f in facts if f["slurm"]}
    if len(jobs) > 1 or any(f["slurm"] is None for f in facts):
        return Check(
            "slurm",
            FAIL,
            f"the processes belong to different SLURM jobs ({', '.join(sorted(jobs))}); "
            "start every node from one job (srun inside sbatch)",
        )
    if int(s0["nnodes"]) != len(nodes):
        return Check(
            "slurm",
            FAIL,
            f"job {s0['job_id']} has {s0['nnodes']} node(s), the processes run on "
            f"{len(nodes)} ({', '.join(nodes)}); launch one task per node "
            "(srun --ntasks-per-node=1), as launch/multi_node.sbatch does",
        )
    for node, fs in _by_node(facts).items():
        s, d = fs[0]["slurm"], fs[0]["devices"]
        if s["gpus_on_node"] and int(s["gpus_on_node"]) != d["gpus"]:
            return Check(
                "slurm",
                WARN,
                f"node {node}: SLURM allocated {s['gpus_on_node']} GPU(s), {d['gpus']} are "
                "visible; check CUDA_VISIBLE_DEVICES and --gpus-per-node",
            )
    ids = ",".join(str(f["slurm"]["nodeid"]) for f in facts if f["local_rank"] == 0)
    settings = ", ".join(f"{k} {s0.get(k)}" for k in ("requeue", "signal", "time_limit") if k in s0)
    return Check(
        "slurm",
        OK,
        f"job {s0['job_id']}: {s0['nnodes']} node(s) ({s0['job_nodelist']}), node ids {ids}, "
        f"GPUs per node {s0['gpus_on_node'] or 0}" + (f"; {settings}" if settings else ""),
    )


def run_directory(facts: list[dict[str, Any]], output_dir: str) -> list[Check]:
    """Writable by every rank, the same directory on every node, and room for checkpoints."""
    bad = [f for f in facts if not f["run_dir"]["writable"]]
    if bad:
        return [Check("run directory", FAIL, f"{_where(bad[0])}: {bad[0]['run_dir']['error']}")]
    unseen = [f for f in facts if not f["sees_token"]]
    nodes = len(_by_node(facts))
    if unseen:
        shared = Check(
            "run directory",
            FAIL,
            f"{_where(unseen[0])} does not see the file rank 0 wrote in "
            f"{output_dir}: it is not the same directory on every node (a node-local "
            "disk?); put --output-dir on a filesystem every node mounts",
        )
    else:
        same = f", the same on all {nodes} nodes" if nodes > 1 else ""
        shared = Check("run directory", OK, f"{output_dir} writable{same}")
    least = min(facts, key=lambda f: f["run_dir"]["free_bytes"])
    free = least["run_dir"]["free_bytes"]
    status, fix = (
        (OK, "")
        if free >= MIN_FREE_BYTES
        else (FAIL, f"; free at least {MIN_FREE_BYTES >> 20} MB for checkpoints, or choose another --output-dir")
    )
    detail = f"{free / 2**30:.1f} GB free in {output_dir} (least: node {least['node']}){fix}"
    return [shared, Check("disk", status, detail)]


def data_present(facts: list[dict[str, Any]], data_dir: str, dataset: str) -> Check:
    """Every file verified on every node (facts of each node's local rank 0)."""
    from ..data.sources import DATASETS, fix_command

    for f in facts:
        data = f["data"]
        if data is None:
            continue
        if data["corrupt"]:
            return Check(
                "data",
                FAIL,
                f"node {f['node']}: {data['corrupt'][0]}; re-fetch it with: {fix_command(data_dir, DATASETS[dataset])}",
            )
        if data["missing"]:
            return Check(
                "data",
                FAIL,
                f"node {f['node']}: {dataset} is missing in {data['raw_dir']} "
                f"({len(data['missing'])} of 4 files); fetch it first, where there is internet: "
                f"mnist-dist data download --dataset {dataset} --data-dir {data_dir}",
            )
    return Check(
        "data",
        OK,
        f"{dataset} verified (sizes and md5s) in {facts[0]['data']['raw_dir']}"
        + (" on every node" if len(_by_node(facts)) > 1 else ""),
    )
