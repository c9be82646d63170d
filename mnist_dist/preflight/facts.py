"""What one process of ``mnist-dist doctor`` sees: versions, devices, SLURM, run directory, data, wandb.

Facts are plain dicts (JSON-ready), gathered from every rank to the main process, where
``verdicts.py`` judges them. Each verdict is a ``Check``: ok, warn (training runs, but not
as well as it could) or fail (training would fail or hang), with one line saying what is
wrong and how to fix it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..distributed.rendezvous import node_name
from ..distributed.runtime import versions

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_FREE_BYTES = 64 * 2**20  # checkpoints of this model are a few MB; leave room for logs and wandb


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: str  # OK, WARN or FAIL
    detail: str  # what was seen; for WARN/FAIL, what is wrong and how to fix it


# -- facts of one process ----------------------------------------------------------------------


def devices(cpu: bool) -> dict[str, Any]:
    """GPUs (count, names, bf16, NCCL) and CPUs (count, threads) as this process sees them."""
    import torch

    out: dict[str, Any] = {
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpus": 0,
        "gpu_names": [],
        "bf16": None,
        "nccl": None,
        "uses": "cpu" if cpu or not torch.cuda.is_available() else "cuda",
    }
    if torch.cuda.is_available():
        out["gpus"] = torch.cuda.device_count()
        out["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(out["gpus"])]
        out["bf16"] = bool(torch.cuda.is_bf16_supported())
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return out


def slurm(env: Any = os.environ) -> dict[str, Any] | None:
    """The SLURM allocation as this node sees it (None outside a job)."""
    if not env.get("SLURM_JOB_ID"):
        return None
    keys = (
        "SLURM_JOB_ID",
        "SLURM_NNODES",
        "SLURM_NTASKS",
        "SLURM_NODEID",
        "SLURM_GPUS_ON_NODE",
        "SLURM_CPUS_PER_TASK",
        "SLURM_CPUS_ON_NODE",
        "SLURM_JOB_NODELIST",
        "SLURM_RESTART_COUNT",
    )
    return {k[len("SLURM_") :].lower(): env.get(k) for k in keys}


def slurm_settings(job_id: str) -> dict[str, Any]:
    """Requeue and time limit (``scontrol show job``), and a ``--signal`` in the batch script, if readable."""
    out: dict[str, Any] = {"requeue": None, "time_limit": None, "signal": None}
    try:
        shown = subprocess.run(
            ["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True, timeout=10
        ).stdout
        fields = dict(kv.split("=", 1) for kv in shown.split() if "=" in kv)
        out["requeue"] = fields.get("Requeue") == "1"
        out["time_limit"] = fields.get("TimeLimit")
        script = subprocess.run(
            ["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True, timeout=10
        ).stdout
        for line in script.splitlines():
            if line.startswith("#SBATCH") and "--signal" in line:
                out["signal"] = line.split("--signal", 1)[1].lstrip("= ").split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def data_status(data_dir: str, dataset: str) -> dict[str, Any]:
    """Each file of the dataset: verified, missing or corrupt (sizes and md5s, nothing fetched)."""
    from ..data.sources import DATASETS, find_file, raw_dir, verify_file

    spec = DATASETS[dataset]
    raw = raw_dir(data_dir, spec)
    missing, corrupt = [], []
    for f in spec.files:
        path = find_file(raw, f)
        if path is None:
            missing.append(f.name)
        elif (problem := verify_file(path, f)) is not None:
            corrupt.append(problem)
    return {"raw_dir": str(raw), "missing": missing, "corrupt": corrupt}


def run_dir_status(output_dir: str) -> dict[str, Any]:
    """Whether this process can write the run directory, and the free space there."""
    from ..errors import RunDirError
    from ..runs import prepare_run_dir

    try:
        run_dir = prepare_run_dir(output_dir)
    except RunDirError as exc:
        return {"writable": False, "error": str(exc), "free_bytes": None}
    return {"writable": True, "error": None, "free_bytes": shutil.disk_usage(run_dir).free}


def write_token(output_dir: str) -> tuple[Path, str]:
    """The main process's token file in the run directory (other nodes must read it back)."""
    token = uuid.uuid4().hex
    path = Path(output_dir) / f".doctor-{token[:12]}"
    path.write_text(token)
    return path, token


def sees_token(path: str, token: str) -> bool:
    """Whether this process reads back the main process's token: the same run directory."""
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def wandb_plan(cfg, run_dir: str) -> Check:
    """What the tracker will do (main process): never a failure, wandb does not stop training."""
    from ..tracking.wandb_run import has_wandb_credentials

    if cfg.tracker == "none":
        return Check("wandb", OK, "tracker none: the run's history.jsonl only")
    if importlib.util.find_spec("wandb") is None:
        return Check("wandb", WARN, "wandb is not installed: training keeps history.jsonl only; pip install wandb")
    mode = os.environ.get("WANDB_MODE") or ("disabled" if os.environ.get("WANDB_DISABLED") else None)
    sync = f"upload later with: wandb sync {Path(cfg.wandb_dir or run_dir) / 'wandb' / 'offline-run-*'}"
    creds = has_wandb_credentials()
    if mode in ("disabled", "dryrun"):
        return Check("wandb", OK, f"WANDB_MODE={mode}: nothing is logged to wandb")
    if mode == "offline" or (mode is None and not creds):
        why = "WANDB_MODE=offline" if mode else "no credentials: WANDB_API_KEY or ~/.netrc"
        return Check("wandb", OK, f"offline ({why}); {sync}")
    if not creds:
        return Check(
            "wandb",
            WARN,
            f"WANDB_MODE={mode} without credentials: wandb will fail to start and training "
            "goes on with history.jsonl only; run wandb login, or set WANDB_MODE=offline",
        )
    return Check("wandb", OK, f"online as project {cfg.wandb_project} (credentials found; server not contacted)")


def local_facts(cfg) -> dict[str, Any]:
    """Everything one process reports before meeting the others."""
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", "0"))
    facts: dict[str, Any] = {
        "rank": int(env.get("RANK", "0")),
        "local_rank": local_rank,
        "node": node_name(env),
        "procs_per_node": int(env.get("PROCS_PER_NODE") or env.get("LOCAL_WORLD_SIZE") or 1),
        "versions": versions(),
        "devices": devices(cfg.cpu),
        "slurm": slurm(env),
        "run_dir": run_dir_status(cfg.output_dir),
        "data": data_status(cfg.data_dir, cfg.dataset) if local_rank == 0 else None,
    }
    if facts["slurm"] and local_rank == 0 and facts["slurm"]["nodeid"] in ("0", None):
        facts["slurm"].update(slurm_settings(facts["slurm"]["job_id"]))
    return facts
