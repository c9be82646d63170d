"""Benchmark: the naive pipeline, the compute floor and mnist-dist, side by side.

    python bench/run.py [--repeats 3] [--data-dir data] [--write bench/RESULTS.md]
    python bench/run.py --against /tmp/before --only "mnist-dist, 2 processes, global batch"

Each configuration runs as a whole process (start to exit), interleaved round by round
so that machine noise hits all alike; figures are medians over the rounds. Peak memory
is the largest resident set of any one process of the command (``/usr/bin/time``'s
maximum resident set size, which is per process).

``--against DIR`` also runs the chosen mnist-dist configurations from another checkout of
the project (``git worktree add DIR COMMIT``), interleaved with this tree's: the cost of a
change, measured side by side (e.g. the stall watchdog and the per-rank timing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN_SAMPLES = 60000 * 10  # reference recipe: 10 epochs


def launch(n: int, *extra: str) -> list[str]:
    return [
        PY,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/cpu.yaml",
        "--num_processes",
        str(n),
        "-m",
        "mnist_dist.train",
        "--cpu",
        *extra,
    ]


def configurations(data_dir: str) -> dict[str, tuple[list[str], str]]:
    """name -> (command, how it reports: 'json' line on stdout or 'run' directory)."""
    ref = ["--config", "configs/train/reference.yaml", "--data-dir", data_dir]
    return {
        "import torch+torchvision+accelerate": ([PY, "-c", "import torch, torchvision, accelerate"], "none"),
        "naive baseline": ([PY, "bench/naive.py", "--data-dir", data_dir], "json"),
        "compute floor": ([PY, "bench/floor.py", "--data-dir", data_dir], "json"),
        "mnist-dist, 1 process": ([PY, "-m", "mnist_dist.train", *ref], "run"),
        "mnist-dist, 2 processes, global batch": (launch(2, *ref), "run"),
        "mnist-dist, 2 processes, per-device batch": (
            launch(2, *ref, "--batch-mode", "per_device", "--lr-scaling", "linear"),
            "run",
        ),
    }


AGAINST = " (against)"


def measure(cmd: list[str], kind: str, env: dict, tree: Path = REPO) -> dict:
    with tempfile.TemporaryDirectory() as out:
        if kind == "run":
            cmd = [*cmd, "--output-dir", out]
        start = time.perf_counter()
        env = {**env, "PYTHONPATH": str(tree)}  # `-m mnist_dist...` imports that tree's package
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=tree, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
        result = {"end_to_end": wall, "peak_mb": peak_kb / 1024}
        if kind == "json":
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            result.update(accuracy=data["accuracy"], train=data["train_seconds"], eval=data["eval_seconds"])
            if data.get("steady_step_seconds"):
                result["steady"] = data["steady_step_seconds"]
        elif kind == "run":
            m = json.loads((Path(out) / "metrics.json").read_text())
            result.update(
                accuracy=m["test_accuracy"],
                train=m["train_seconds"],
                eval=m["eval_seconds"],
                steady=m["steady_step_seconds"],
                samples_per_second=m["steps"] * m["global_batch_size"] / m["train_seconds"],
            )
        if "train" in result and "samples_per_second" not in result:
            result["samples_per_second"] = TRAIN_SAMPLES / result["train"]
        return result


def median(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def table(results: dict[str, list[dict]]) -> str:
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = [
        "| configuration | accuracy | train s | steady ms/step | eval s | end-to-end s | samples/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        acc, steady = median(rows, "accuracy"), median(rows, "steady")
        lines.append(
            f"| {name} | {fmt(acc and 100 * acc, '.2f')} | {fmt(median(rows, 'train'), '.2f')} | "
            f"{fmt(steady and 1000 * steady, '.3f')} | "
            f"{fmt(median(rows, 'eval'), '.3f')} | {fmt(median(rows, 'end_to_end'), '.2f')} | "
            f"{fmt(median(rows, 'samples_per_second'), ',.0f')} | {fmt(median(rows, 'peak_mb'), '.0f')} |"
        )
    base, ours, floor = (results.get(k) for k in ("naive baseline", "mnist-dist, 1 process", "compute floor"))
    imp = results.get("import torch+torchvision+accelerate")
    lines.append("")
    if base and ours:
        lines.append(
            f"- naive / mnist-dist end to end: **{median(base, 'end_to_end') / median(ours, 'end_to_end'):.2f}x**"
        )
    if floor and ours and median(floor, "steady") and median(ours, "steady"):
        ratio = median(ours, "steady") / median(floor, "steady")
        lines.append(f"- mnist-dist / floor, steady time per step (warm-up apart): **{ratio:.3f}x**")
    if imp and ours:
        above = median(ours, "peak_mb") - median(imp, "peak_mb")
        lines.append(f"- mnist-dist peak RSS above the bare import: **{above:.0f} MB**")
    for name, rows in results.items():
        if name.endswith(AGAINST) and name.removesuffix(AGAINST) in results:
            this = median(results[name.removesuffix(AGAINST)], "train") / median(rows, "train")
            lines.append(f"- {name.removesuffix(AGAINST)}, training time, this tree / the other: **{this:.3f}x**")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--only", nargs="*", help="run only these configurations (names as printed)")
    parser.add_argument("--write", help="also write the results as Markdown to this file")
    parser.add_argument("--against", help="another checkout whose mnist-dist configurations run beside these")
    args = parser.parse_args()
    from mnist_dist.data.sources import ensure_dataset

    ensure_dataset(args.data_dir, "mnist")
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    configs = configurations(args.data_dir)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only}
    trees = {name: REPO for name in configs}
    if args.against:
        for name, config in list(configs.items()):
            if config[1] == "run":
                configs[name + AGAINST], trees[name + AGAINST] = config, Path(args.against).resolve()
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for round_ in range(args.repeats):
        for name, (cmd, kind) in configs.items():
            r = measure(cmd, kind, env, trees[name])
            results[name].append(r)
            print(
                f"round {round_ + 1}/{args.repeats} {name}: " + json.dumps({k: round(v, 4) for k, v in r.items()}),
                flush=True,
            )
    text = table(results)
    print(text)
    if args.write:
        header = (
            f"Measured {date.today().isoformat()} on {platform.node() or 'this machine'}: "
            f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python "
            f"{platform.python_version()}, torch {__import__('torch').__version__}; medians of "
            f"{args.repeats} interleaved rounds.\n\nCommand: `python bench/run.py --repeats {args.repeats}`\n\n"
        )
        write_between_markers(Path(args.write), header + text + "\n")


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_between_markers(path: Path, text: str) -> None:
    """Put ``text`` between the markers of ``path``, keeping the rest (the analysis) as it is."""
    old = path.read_text() if path.exists() else f"{START}\n{END}\n"
    if START not in old or END not in old:
        old = f"{START}\n{END}\n\n{old}"
    before, rest = old.split(START, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{START}\n{text}{END}{after}")


if __name__ == "__main__":
    main()
