"""What checksums cost a checkpoint: saves with and without them, interleaved, and one verification.

    python bench/checkpoint_cost.py --repeats 40

Saves checkpoints of the 784-256-10 MLP with SGD momentum (the best recipe's optimizer
state, the larger kind) into a temporary directory, keeping 2 as training does, and prints
medians. "Without" replaces the SHA-256 with nothing, which leaves sizes-only checks: what
checkpoints were before. A save then also verifies the older checkpoint it keeps (retention
never counts a damaged one).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from mnist_dist.config import Config
from mnist_dist.model import MLP
from mnist_dist.training import checkpoint, integrity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    model = MLP()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    model(torch.rand(8, 28, 28)).sum().backward()
    optimizer.step()  # momentum buffers exist
    state = {
        "progress": {"step": 0, "epoch": 0, "batch": 0, "train_seconds": 0.0},
        "world_size": 1,
        "config": Config().to_dict(),
        "scheduler": None,
        "wandb_run_id": None,
    }
    rank = {"interval_loss": 0.0, "interval_steps": 0, "epoch_loss": 0.0, "epoch_steps": 0}
    real = checkpoint.sha256_file, integrity._sha256_at
    none = (lambda path: ""), (lambda dir_fd, name: "")
    times: dict[str, list[float]] = {"with": [], "without": []}
    verify = []
    with tempfile.TemporaryDirectory() as run_dir:
        for step in range(1, 2 * args.repeats + 1):
            mode = "with" if step % 2 else "without"
            checkpoint.sha256_file, integrity._sha256_at = real if mode == "with" else none
            start = time.perf_counter()
            position = {**state["progress"], "step": step}
            path = checkpoint.save(accelerator, Path(run_dir), {**state, "progress": position}, rank, keep=2)
            times[mode].append(time.perf_counter() - start)
            if mode == "with":
                start = time.perf_counter()
                assert integrity.inspect(path).ok
                verify.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir())
    with_ms, without_ms = (1000 * statistics.median(times[m]) for m in ("with", "without"))
    print(f"checkpoint of {size / 1e6:.2f} MB; medians of {args.repeats} saves each, interleaved:")
    print(
        f"  save with SHA-256 checksums: {with_ms:.1f} ms; with sizes only: {without_ms:.1f} ms; "
        f"checksums add {with_ms - without_ms:.1f} ms ({with_ms / without_ms:.2f}x)"
    )
    print(f"  verifying one checkpoint before loading it: {1000 * statistics.median(verify):.1f} ms")


if __name__ == "__main__":
    main()
