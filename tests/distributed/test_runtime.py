"""The one Accelerator of a run, and its logging."""

import logging

import torch

from mnist_dist.config import build_config
from mnist_dist.distributed import runtime
from mnist_dist.distributed.runtime import build_accelerator, compile_toolchain_missing, setup_logging


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


def test_what_torch_compile_lacks_is_named_with_its_fix(monkeypatch, tmp_path):
    for key in ("CC", "CXX"):
        monkeypatch.delenv(key, raising=False)
    headers = tmp_path / "include"
    headers.mkdir()
    (headers / "Python.h").write_text("")
    monkeypatch.setattr(runtime.sysconfig, "get_paths", lambda: {"include": str(headers)})
    monkeypatch.setattr(runtime.shutil, "which", lambda name: f"/usr/bin/{name}" if name in ("g++", "gcc") else None)
    assert compile_toolchain_missing("cpu") is None
    assert compile_toolchain_missing("cuda") in (None, "Triton is not installed")
    monkeypatch.setenv("CXX", "clang++ -stdlib=libc++")  # a compiler with its flags, as users set it
    assert "clang++ -stdlib=libc++ not found" in compile_toolchain_missing("cpu")
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: object())  # Triton: there
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    said = compile_toolchain_missing("cuda")
    assert "no C compiler for Triton's launcher (gcc or clang not found" in said and "set CC" in said
    monkeypatch.setattr(runtime.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert compile_toolchain_missing("cuda") is None
    (headers / "Python.h").unlink()
    assert f"no Python headers ({headers / 'Python.h'}" in compile_toolchain_missing("cuda")
