"""Pictures of a finished run, drawn from its own files (no tracker needed).

``mnist-dist report RUN_DIR`` reads ``history.jsonl`` and ``misclassified.safetensors``
(written by training) and writes into RUN_DIR:

- ``curves.png``: training loss per log interval and test loss per epoch; test accuracy per epoch;
- ``confusion_matrix.png``: counts of true digit x predicted digit on the test set;
- ``misclassified.png``: the first misclassified test digits with predicted and true labels;
- ``timing.png`` (several processes): each rank's own work and wait per step, per log interval.

The digit grid needs only Pillow (training sends it to wandb too); the charts need matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ReportError
from ..runs import CONFUSION_FILE, CURVES_FILE, GRID_FILE, HISTORY_FILE, MISCLASSIFIED_FILE, TIMING_FILE
from .history import one_timeline, read_history
from .pictures import misclassified_grid


def load_history(run_dir: Path) -> dict[str, Any]:
    """The records of ``history.jsonl``: config, step and epoch lists, and the final summary.

    Records that a resume superseded (logged by a timeline that crashed after its last
    checkpoint) are left out, so each step appears once.
    """
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        raise ReportError(f"{path} does not exist: pass the --output-dir of a training run")
    out: dict[str, Any] = {"config": {}, "step": [], "epoch": [], "summary": None}
    try:
        records = read_history(path)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    for record in one_timeline(records):  # a resumed run reads as one run
        kind = record.get("kind")
        if kind == "config":
            out["config"] = record.get("config", {})
        elif kind in ("step", "epoch"):
            out[kind].append(record)
        elif kind == "summary":
            out["summary"] = record
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("the report's charts need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _title(run_dir: Path, config: dict[str, Any]) -> str:
    parts = []
    if "batch_size" in config:
        parts.append(f"batch {config['batch_size']}")
    if "lr" in config:
        parts.append(f"lr {config['lr']:g}")
    if "epochs" in config:
        parts.append(f"{config['epochs']} epochs")
    if "world_size" in config:
        parts.append(f"{config['world_size']} process{'es' if config['world_size'] != 1 else ''}")
    details = ", ".join(parts)
    return f"run {Path(run_dir).resolve().name}" + (f" ({details})" if details else "")


def _draw_loss(ax, steps: list[dict], epochs: list[dict], split: str) -> None:
    from matplotlib.ticker import FuncFormatter

    if steps:
        ax.plot(
            [r["step"] for r in steps],
            [r["train/loss"] for r in steps],
            lw=1.2,
            label="train loss (mean of each log interval)",
        )
    if epochs:
        ax.plot(
            [r["step"] for r in epochs],
            [r[f"{split}/loss"] for r in epochs],
            "o-",
            lw=1.5,
            label=f"{split} loss (end of epoch)",
        )
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss (log scale)", yscale="log", title="Loss")
    # Plain numbers (0.2, not 2x10^-1); between powers of ten only 2 and 5 are labelled, so labels never crowd.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _draw_accuracy(ax, epochs: list[dict], split: str) -> None:
    if epochs:
        x = [r["epoch"] for r in epochs]
        acc = [100 * r[f"{split}/accuracy"] for r in epochs]
        ax.plot(x, acc, "o-", color="tab:green")
        for xi, a in zip(x, acc):
            ax.annotate(f"{a:.2f}", (xi, a), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax.set_xticks(x)
        low, high = min(acc), max(acc)
        ax.set_ylim(low - max(0.3, (high - low) * 0.15), min(100, high + max(0.3, (high - low) * 0.15)))
    ax.set(xlabel="epoch", ylabel=f"{split} accuracy (%)", title=f"{split.capitalize()} accuracy after each epoch")
    ax.grid(True, alpha=0.3)


def plot_curves(history: dict[str, Any], path: Path, title: str) -> None:
    """Loss (train per interval, test per epoch) against steps; test accuracy per epoch."""
    plt = _pyplot()
    steps, epochs = history["step"], history["epoch"]
    if not steps and not epochs:
        raise ReportError("the history holds no training records yet")
    # A run with --val-size evaluates on its validation hold-out: "val/..." instead of "test/...".
    split = "val" if epochs and "val/loss" in epochs[0] else "test"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    _draw_loss(ax_loss, steps, epochs, split)
    _draw_accuracy(ax_acc, epochs, split)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timing(steps: list[dict], path: Path, title: str) -> None:
    """Each rank's time per step, per log interval: its own work (data + compute) and its wait in collectives."""
    plt = _pyplot()
    x = [r["step"] for r in steps]
    world = len(steps[0]["ranks/compute_s"])
    fig, (ax_own, ax_wait) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for rank in range(world):
        own = [1000 * (r["ranks/data_s"][rank] + r["ranks/compute_s"][rank]) for r in steps]
        ax_own.plot(x, own, label=f"rank {rank}", linewidth=1.2)
        ax_wait.plot(x, [1000 * r["ranks/collective_s"][rank] for r in steps], label=f"rank {rank}", linewidth=1.2)
    ax_own.set(xlabel="step", ylabel="ms per step", title="Own work (data + compute)")
    ax_wait.set(xlabel="step", title="Waiting in collectives (for the slowest rank)")
    for ax in (ax_own, ax_wait):
        ax.grid(True, alpha=0.3)
    ax_wait.legend(fontsize=8, ncol=max(1, world // 8))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], path: Path, title: str) -> None:
    """Heat map of counts (log colour scale: the diagonal dwarfs the errors), every cell labelled."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    matrix = torch.tensor(confusion, dtype=torch.float64)
    n = len(matrix)
    accuracy = 100 * matrix.diag().sum().item() / max(matrix.sum().item(), 1)
    fig, ax = plt.subplots(figsize=(7.2, 6.2))
    norm = LogNorm(vmin=0.8, vmax=max(matrix.max().item(), 1))  # zeros drawn as 0.8: the palest blue
    image = ax.imshow(matrix.clamp(min=0.8).numpy(), cmap="Blues", norm=norm)
    for t in range(n):
        for p in range(n):
            count = int(matrix[t, p])
            dark = count > matrix.max().item() ** 0.75
            ax.text(
                p,
                t,
                str(count),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else ("black" if count else "0.7"),
            )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set(
        xlabel="predicted digit",
        ylabel="true digit",
        title=f"Confusion matrix, test set: {accuracy:.2f}% correct\n{title}",
    )
    fig.colorbar(image, ax=ax, label="images (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_misclassified(run_dir: Path, path: Path, title: str) -> None:
    """The digit grid with a one-line heading."""
    from PIL import Image, ImageDraw, ImageFont
    from safetensors.torch import load_file

    source = Path(run_dir) / MISCLASSIFIED_FILE
    if not source.is_file():
        raise ReportError(f"{source} does not exist: the run has not finished")
    ex = load_file(str(source))
    grid = misclassified_grid(ex["images"], ex["predicted"], ex["label"])
    try:
        font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=12)
    except TypeError:
        font = small = ImageFont.load_default()
    heading = f"First {len(ex['images'])} misclassified test digits\npred (red): the model's answer; true: the label"
    page = Image.new("RGB", (grid.width, grid.height + 66), "white")
    page.paste(grid, (0, 66))
    draw = ImageDraw.Draw(page)
    draw.multiline_text((6, 6), heading, fill="black", font=font, spacing=4)
    draw.text((page.width - 6 - draw.textlength(title, font=small), 36), title, fill=(90, 90, 90), font=small)
    page.save(path)


def write_report(run_dir: str | Path) -> list[Path]:
    """Write the PNGs of a finished run into ``run_dir`` (three, four with several processes); return their paths."""
    run_dir = Path(run_dir)
    history = load_history(run_dir)
    if history["summary"] is None:
        raise ReportError(f"{run_dir / HISTORY_FILE} has no final summary: the run has not finished")
    title = _title(run_dir, history["config"])
    paths = [run_dir / CURVES_FILE, run_dir / CONFUSION_FILE, run_dir / GRID_FILE]
    plot_curves(history, paths[0], title)
    plot_confusion(history["summary"]["confusion_matrix"], paths[1], title)
    save_misclassified(run_dir, paths[2], title)
    timed = [r for r in history["step"] if "ranks/compute_s" in r]
    if timed:  # a run of several processes
        paths.append(run_dir / TIMING_FILE)
        plot_timing(timed, paths[-1], title)
    return paths
