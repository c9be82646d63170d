"""Files of a run directory, each written atomically (temporary name, then rename).

A run directory holds ``config.yaml`` (the merged config), ``metrics.json`` and
``model.safetensors`` (the MLP's state dict). A crash mid-write leaves the previous
file intact, never a half-written one.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE = "config.yaml", "metrics.json", "model.safetensors"


class RunDirError(OSError):
    """The run directory cannot be used; the message says why and what to do."""


def prepare_run_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is writable, before any training time is spent."""
    run_dir = Path(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Unique across nodes sharing the directory (same pid on two hosts is common).
        probe = run_dir / f".write-test-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(
            f"output directory {run_dir} is not writable ({exc.strerror or exc}); "
            "pass a writable directory with --output-dir"
        ) from None
    return run_dir


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"could not write {path} ({exc.strerror or exc}); the previous copy is kept") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Save a state dict as safetensors (no pickle: loading it can run no code)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(tensors))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict, with an error that names the file if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist (a run writes {WEIGHTS_FILE} in its --output-dir)")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{p} is not a safetensors weights file ({exc})") from None
