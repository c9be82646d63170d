"""Pictures of a finished run, drawn from its own files (no tracker needed).

``mnist-dist report RUN_DIR`` reads ``history.jsonl`` and ``misclassified.safetensors``
(written by training) and writes into RUN_DIR:

- ``curves.png``: training loss per log interval and test loss per epoch; test accuracy per epoch;
- ``confusion_matrix.png``: counts of true digit x predicted digit on the test set;
- ``misclassified.png``: the first misclassified test digits with predicted and true labels.

The digit grid needs only Pillow (training sends it to wandb too); the charts need matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch

from .tracking import HISTORY_FILE, MISCLASSIFIED_FILE, one_timeline, read_history

CURVES_FILE, CONFUSION_FILE, GRID_FILE = "curves.png", "confusion_matrix.png", "misclassified.png"


class ReportError(ValueError):
    """The run directory lacks what a picture needs; the message says what."""


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


def misclassified_grid(
    images: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, columns: int = 8, scale: int = 3
):
    """A PIL image: each digit (dark on white, enlarged ``scale`` x) above "predicted / true"."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        font = ImageFont.load_default()
    side, caption, pad = 28 * scale, 18, 6
    cell_w, cell_h = side + 2 * pad, side + caption + 2 * pad
    n = len(images)
    rows = max(1, -(-n // columns))
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    if n == 0:
        draw.text((pad, pad), "no misclassified digits", fill="black", font=font)
    for i in range(n):
        x, y = (i % columns) * cell_w + pad, (i // columns) * cell_h + pad
        digit = Image.fromarray((255 - images[i].to(torch.uint8)).numpy(), mode="L")
        grid.paste(digit.resize((side, side), Image.Resampling.NEAREST).convert("RGB"), (x, y))
        draw.rectangle((x - 1, y - 1, x + side, y + side), outline=(190, 190, 190))
        pred_text, true_text = f"pred {int(predicted[i])}", f"true {int(labels[i])}"
        draw.text((x, y + side + 3), pred_text, fill=(200, 0, 0), font=font)
        right = x + side - draw.textlength(true_text, font=font)  # right-aligned under the digit
        draw.text((right, y + side + 3), true_text, fill=(0, 0, 0), font=font)
    return grid


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


def plot_curves(history: dict[str, Any], path: Path, title: str) -> None:
    """Loss (train per interval, test per epoch) against steps; test accuracy per epoch."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    steps, epochs = history["step"], history["epoch"]
    if not steps and not epochs:
        raise ReportError("the history holds no training records yet")
    # A run with --val-size evaluates on its validation hold-out: "val/..." instead of "test/...".
    split = "val" if epochs and "val/loss" in epochs[0] else "test"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    if steps:
        ax_loss.plot(
            [r["step"] for r in steps],
            [r["train/loss"] for r in steps],
            lw=1.2,
            label="train loss (mean of each log interval)",
        )
    if epochs:
        ax_loss.plot(
            [r["step"] for r in epochs],
            [r[f"{split}/loss"] for r in epochs],
            "o-",
            lw=1.5,
            label=f"{split} loss (end of epoch)",
        )
    ax_loss.set(xlabel="optimizer step", ylabel="cross-entropy loss (log scale)", yscale="log", title="Loss")
    # Plain numbers (0.2, not 2x10^-1); between powers of ten only 2 and 5 are labelled, so labels never crowd.
    ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_loss.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend()
    if epochs:
        x = [r["epoch"] for r in epochs]
        acc = [100 * r[f"{split}/accuracy"] for r in epochs]
        ax_acc.plot(x, acc, "o-", color="tab:green")
        for xi, a in zip(x, acc):
            ax_acc.annotate(f"{a:.2f}", (xi, a), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        ax_acc.set_xticks(x)
        low, high = min(acc), max(acc)
        ax_acc.set_ylim(low - max(0.3, (high - low) * 0.15), min(100, high + max(0.3, (high - low) * 0.15)))
    ax_acc.set(xlabel="epoch", ylabel=f"{split} accuracy (%)", title=f"{split.capitalize()} accuracy after each epoch")
    ax_acc.grid(True, alpha=0.3)
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
    """Write the three PNGs of a finished run into ``run_dir``; return their paths."""
    run_dir = Path(run_dir)
    history = load_history(run_dir)
    if history["summary"] is None:
        raise ReportError(f"{run_dir / HISTORY_FILE} has no final summary: the run has not finished")
    title = _title(run_dir, history["config"])
    paths = [run_dir / CURVES_FILE, run_dir / CONFUSION_FILE, run_dir / GRID_FILE]
    plot_curves(history, paths[0], title)
    plot_confusion(history["summary"]["confusion_matrix"], paths[1], title)
    save_misclassified(run_dir, paths[2], title)
    return paths


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report_command(run_dir: str) -> None:
    """Draw a finished run's pictures into RUN_DIR: curves, confusion matrix, misclassified digits."""
    try:
        paths = write_report(run_dir)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    for path in paths:
        click.echo(f"wrote {path}")
