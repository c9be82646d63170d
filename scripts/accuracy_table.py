"""Rerun the reference and the best recipe over several seeds; print the table of docs/accuracy.md.

    python scripts/accuracy_table.py [--seeds 0 1 2] [--runs-dir runs/accuracy] [--output table.md]

Runs, one at a time: the reference recipe and the best recipe on 1 process, and the best
recipe on 2 CPU processes (``accelerate launch --config_file configs/accelerate/cpu.yaml``,
one thread each). Each run is the documented command, e.g.
``python -m mnist_dist.train --config configs/train/best.yaml --seed 1``, writing its own
run directory; ``--reuse`` keeps runs that already have a ``metrics.json``. The table gives
test accuracy per seed, mean, spread and ``train_seconds`` (time in training steps only).
Training time depends on what else the machine is doing: the table says how loaded it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"reference": "configs/train/reference.yaml", "best": "configs/train/best.yaml"}
# (recipe, processes) rows of the table, in order.
ROWS = (("reference", 1), ("best", 1), ("best", 2))


def command(config: str, seed: int, out: Path, processes: int, data_dir: str) -> list[str]:
    train = [
        "-m",
        "mnist_dist.train",
        "--config",
        config,
        "--seed",
        str(seed),
        "--output-dir",
        str(out),
        "--data-dir",
        data_dir,
    ]
    if processes == 1:
        return [sys.executable, *train]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/cpu.yaml",
        "--num_processes",
        str(processes),
        "--num_cpu_threads_per_process",
        "1",
        *train,
        "--cpu",
    ]


def run(recipe: str, processes: int, seed: int, args) -> dict:
    out = Path(args.runs_dir) / f"{recipe}-{processes}p-seed{seed}"
    metrics_file = out / "metrics.json"
    if args.reuse and metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    cmd = command(RECIPES[recipe], seed, out, processes, args.data_dir)
    env = dict(os.environ)
    if processes > 1:
        env["OMP_NUM_THREADS"] = "1"  # one core per process
    print(f"running {recipe}, {processes} process(es), seed {seed} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    metrics = json.loads(metrics_file.read_text())
    print(
        f"  test accuracy {100 * metrics['test_accuracy']:.2f}%, train_seconds {metrics['train_seconds']:.1f}",
        file=sys.stderr,
        flush=True,
    )
    return metrics


def table(results: dict[tuple[str, int], list[dict]], seeds: list[int]) -> str:
    lines = [
        "| recipe | processes | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | spread (min-max, std) | train_seconds per seed | mean train_seconds |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|---|",
    ]
    for (recipe, processes), runs in results.items():
        acc = [100 * m["test_accuracy"] for m in runs]
        secs = [m["train_seconds"] for m in runs]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        lines.append(
            f"| {recipe} | {processes} | "
            + " | ".join(f"{a:.2f}%" for a in acc)
            + f" | **{statistics.mean(acc):.2f}%** | {max(acc) - min(acc):.2f} ({std:.2f}) | "
            + " / ".join(f"{s:.1f}" for s in secs)
            + f" | {statistics.mean(secs):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", default="runs/accuracy")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--output", help="Also write the table (Markdown) to this file.")
    parser.add_argument("--reuse", action="store_true", help="Keep runs that already have a metrics.json.")
    args = parser.parse_args()

    load_before, start = os.getloadavg()[0], time.time()
    results = {row: [run(*row, seed, args) for seed in args.seeds] for row in ROWS}
    load_after = os.getloadavg()[0]
    note = (
        f"{os.cpu_count()} CPU cores; load average {load_before:.1f} before and {load_after:.1f} after "
        f"the runs ({(time.time() - start) / 60:.0f} min in all). train_seconds counts training steps only "
        "(not start-up or evaluation)."
    )
    text = table(results, args.seeds) + "\n\n" + note + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
