"""Run-time set-up shared by training, evaluation and the preflight: the one Accelerator, logging."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import sysconfig
from datetime import timedelta
from pathlib import Path

import torch

from ..config import Config

log = logging.getLogger("mnist_dist")


def world_size_from_env() -> int:
    """World size set by the launcher (torchrun/accelerate), known before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_logging(is_main: bool) -> None:
    """Log INFO on the main process only, so N processes print one log."""
    logging.basicConfig(
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
        level=logging.INFO if is_main else logging.WARNING,
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file save/load messages


def start_process_group(cfg: Config) -> None:
    """Meet the other processes within ``rendezvous_timeout`` seconds, or fail with one line.

    Creates the process group Accelerate would (gloo on CPU, NCCL on GPUs) when it would
    create one: several processes, and CPU or a launcher's LOCAL_RANK. MPI is left to Accelerate.
    """
    from .rendezvous import init_process_group

    on_cpu = cfg.cpu or not torch.cuda.is_available()
    if world_size_from_env() <= 1 or not (on_cpu or "LOCAL_RANK" in os.environ):
        return
    if on_cpu and torch.distributed.is_mpi_available():
        return
    init_process_group("gloo" if on_cpu else "nccl", cfg.rendezvous_timeout, cfg.collective_timeout)


def _on_path(command: str) -> bool:
    """Whether ``command`` (a program, perhaps with flags: ``CXX="clang++ -stdlib=libc++"``) can be run."""
    words = command.split()
    return bool(words) and shutil.which(words[0]) is not None


def compile_toolchain_missing(device_type: str) -> str | None:
    """What torch.compile's inductor lacks on this machine to build its kernels, with the fix; None
    if nothing: on a GPU, Triton and a C compiler for Triton's launcher; on the CPU, a C++
    compiler; on both, Python's headers. (Inductor would fail at the first step otherwise.)"""
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        cc = os.environ.get("CC")
        if not (_on_path(cc) if cc else shutil.which("gcc") or shutil.which("clang")):
            return f"no C compiler for Triton's launcher ({cc or 'gcc or clang'} not found; install one or set CC)"
    else:
        cxx = os.environ.get("CXX", "g++")
        if not _on_path(cxx):
            return f"no C++ compiler for inductor's CPU kernels ({cxx} not found; install g++ or set CXX)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return f"no Python headers ({headers} not found; install the Python development package)"
    return None


def build_accelerator(cfg: Config, log_with: str | None = None):
    """The one Accelerator of a run. Without CUDA it uses CPU processes (gloo).

    ``log_with`` names Accelerate's tracker ("wandb") or is None: none is imported then.
    The processes meet first, bounded by ``rendezvous_timeout`` (see rendezvous.py).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

    start_process_group(cfg)

    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))
    on_cpu = cfg.cpu or not torch.cuda.is_available()
    # torch.compile through Accelerate's plugin; "reduce-overhead" also captures the forward and
    # backward as CUDA graphs on a GPU (it has no effect on CPU). Without a toolchain: eager.
    missing = None if cfg.compile == "none" else compile_toolchain_missing("cpu" if on_cpu else "cuda")
    dynamo = (
        None
        if cfg.compile == "none" or missing
        else TorchDynamoPlugin(backend="inductor", mode=None if cfg.compile == "default" else cfg.compile)
    )
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.mixed_precision,
        dynamo_plugin=dynamo,
        kwargs_handlers=[timeout],
        log_with=log_with,
    )
    if missing and accelerator.is_main_process:
        log.warning("--compile %s: %s; training without torch.compile (eager)", cfg.compile, missing)
    return accelerator


def end_process_group(accelerator) -> None:
    """End the job's process group (every rank, last): no rank exits with a collective in flight."""
    accelerator.state.destroy_process_group()


def versions() -> dict[str, str]:
    """Python and the packages a run depends on ("not installed" when missing): in a run's config
    (the tracker's) and checked to agree on every rank (the preflight's)."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "accelerate", "wandb", "mnist-dist"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
