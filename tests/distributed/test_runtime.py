"""The one Accelerator of a run, and its logging."""

import logging

import torch

from mnist_dist.config import build_config
from mnist_dist.distributed.runtime import build_accelerator, setup_logging


def test_one_process_on_the_cpu_with_the_configs_precision(monkeypatch):
    from accelerate.state import AcceleratorState

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)  # another test's Accelerator in this process
    accelerator = build_accelerator(build_config(None, {"cpu": True, "mixed_precision": "bf16"}))
    assert accelerator.num_processes == 1 and accelerator.device == torch.device("cpu")
    assert accelerator.mixed_precision == "bf16" and not accelerator.trackers


def test_only_the_main_process_logs_info():
    setup_logging(is_main=True)
    assert logging.getLogger("mnist_dist").getEffectiveLevel() == logging.INFO
    setup_logging(is_main=False)
    assert logging.getLogger("mnist_dist").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("accelerate").level == logging.WARNING
    setup_logging(is_main=True)
