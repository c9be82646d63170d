"""The device benchmark: every variant under its own time limit, one summary line each, whatever fails.

    python bench/gpu.py OUT_DIR [--data-dir data] [--max-steps N] [--allow-cpu]

Run from the repository root of a copy of the tree, on a machine with one CUDA GPU, no
pip and no network: it needs torch, accelerate, click, pyyaml, safetensors and numpy
(wandb is not used), and MNIST in ``DATA_DIR/MNIST/raw/`` as the four IDX files, plain or
gzipped (``*-ubyte.gz``, about 11 MB: what to carry to such a machine). It first checks
the environment and names what is missing, then runs, each in a process of its own with
its own timeout:

- ``eager``: the reference recipe, 1 process, non-finite check from a flag on the device;
- ``eager-each-step``: the same with ``--check-finite-each-step`` (one host sync per step);
- ``bf16``: with bf16 autocast;
- ``compile``: ``--compile default`` (compilation is in the warm-up, ``warmup_seconds``,
  reported apart from the steady time per step, ``steady_step_seconds``);
- ``floor``: the bare loop of ``bench/floor.py`` (no Accelerate, no DataLoader);
- ``cuda-tests``: the tests that need a GPU (``-k cuda``).

Each variant writes its log to ``OUT_DIR/<variant>.log``; ``OUT_DIR/summary.json`` holds
every variant's status, seconds and figures, and one line per variant is printed. Time
limits add up to at most 6 minutes. ``--allow-cpu`` runs the same on the CPU (with a small
``--max-steps``) to check the harness itself where there is no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "accelerate", "click", "yaml", "safetensors", "numpy")
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN = ["-m", "mnist_dist.train", "--config", "configs/train/reference.yaml", "--tracker", "none"]
# name, extra arguments of the training command (None: a command of its own), time limit in seconds
VARIANTS = [
    ("eager", [], 60),
    ("eager-each-step", ["--check-finite-each-step"], 60),
    ("bf16", ["--mixed-precision", "bf16"], 60),
    ("compile", ["--compile", "default"], 75),
    ("floor", None, 45),
    ("cuda-tests", None, 60),
]


def missing(data_dir: Path, allow_cpu: bool) -> list[str]:
    """What this machine lacks for the benchmark, each said with its fix."""
    problems = [f"python package {m!r} (not importable)" for m in NEEDED if importlib.util.find_spec(m) is None]
    raw = data_dir / "MNIST" / "raw"
    for name in IDX:
        if not ((raw / name).is_file() or (raw / f"{name}.gz").is_file()):
            problems.append(f"{raw / name}(.gz): carry the MNIST IDX files in {raw}")
    if not problems and not allow_cpu:
        import torch

        if not torch.cuda.is_available():
            problems.append("a CUDA device (torch.cuda.is_available() is False; --allow-cpu runs on the CPU)")
    return problems


def command(name: str, extra: list[str] | None, args) -> list[str]:
    device = ["--cpu"] if args.allow_cpu else ["--no-cpu"]
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    if name == "floor":
        epochs = ["--epochs", "1"] if args.max_steps else []
        return [sys.executable, "bench/floor.py", "--data-dir", str(args.data_dir), *epochs]
    if name == "cuda-tests":
        return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests/training"]
    out = Path(args.out) / name
    return [sys.executable, *TRAIN, *device, *steps, "--data-dir", str(args.data_dir), "--output-dir", str(out), *extra]


def figures(name: str, out: Path, log: str) -> dict:
    """What a finished variant measured: metrics.json of a training run, the floor's JSON line, pytest's tally."""
    if name == "floor":
        lines = [line for line in log.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    if name == "cuda-tests":
        tally = [line for line in log.splitlines() if " passed" in line or " skipped" in line or " failed" in line]
        return {"pytest": tally[-1].strip("= ")} if tally else {}
    metrics = out / name / "metrics.json"
    if not metrics.is_file():
        return {}
    m = json.loads(metrics.read_text())
    timed = ("train_seconds", "warmup_seconds", "steady_step_seconds", "eval_seconds")
    return {k: m.get(k) for k in ("device", "compiled", *timed, "steps", "test_accuracy")}


def run_variant(name: str, extra: list[str] | None, limit: int, args) -> dict:
    out = Path(args.out)
    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # the tree itself: nothing is installed there
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": path}
    began = time.monotonic()
    try:
        proc = subprocess.run(
            command(name, extra, args), cwd=REPO, env=env, capture_output=True, text=True, timeout=limit
        )
        log, status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        status = f"timed out after {limit} s"
    (out / f"{name}.log").write_text(log)
    seconds = round(time.monotonic() - began, 2)
    return {"variant": name, "status": status, "wall_seconds": seconds, **figures(name, out, log)}


def main(argv: list[str] | None = None, variants=VARIANTS) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory for the logs and summary.json")
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--max-steps", type=int, help="shorter runs (the harness on the CPU)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU where there is no GPU")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    problems = missing(args.data_dir, args.allow_cpu)
    summary: dict = {"missing": problems, "variants": []}
    for problem in problems:
        print(f"missing: {problem}")
    if not problems:
        for name, extra, limit in variants:
            result = run_variant(name, extra, limit, args)
            summary["variants"].append(result)
            figures_said = ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("variant", "status"))
            print(f"{name}: {result['status']}; {figures_said}", flush=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
