"""Run-time set-up shared by training, evaluation and the preflight: the one Accelerator, logging."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch

from ..config import Config


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


def build_accelerator(cfg: Config, log_with: str | None = None):
    """The one Accelerator of a run. Without CUDA it uses CPU processes (gloo).

    ``log_with`` names Accelerate's tracker ("wandb") or is None: none is imported then.
    The processes meet first, bounded by ``rendezvous_timeout`` (see rendezvous.py).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

    start_process_group(cfg)

    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout))
    # torch.compile through Accelerate's plugin; "reduce-overhead" also captures CUDA graphs,
    # which is what this launch-bound model needs on a GPU (it has no effect on CPU).
    dynamo = (
        None
        if cfg.compile == "none"
        else TorchDynamoPlugin(backend="inductor", mode=None if cfg.compile == "default" else cfg.compile)
    )
    return Accelerator(
        cpu=cfg.cpu or not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        dynamo_plugin=dynamo,
        kwargs_handlers=[timeout],
        log_with=log_with,
    )


def end_process_group(accelerator) -> None:
    """End the job's process group (every rank, last): no rank exits with a collective in flight."""
    accelerator.state.destroy_process_group()


def versions() -> dict[str, str]:
    """Python and the packages a run depends on ("not installed" when missing): in a run's config
    (the tracker's) and checked to agree on every rank (the preflight's)."""
    import importlib.metadata
    import platform

    out = {"python": platform.python_version()}
    for dist in ("torch", "accelerate", "wandb", "mnist-dist"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
