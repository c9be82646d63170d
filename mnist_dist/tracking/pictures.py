"""The end of a run as people look at it: a grid of misclassified digits drawn with Pillow alone
(training sends it to wandb; the report saves it), the rows of wandb's table of them, and the
charts wandb gets (``final_charts``: wandb is imported only there)."""

from __future__ import annotations

from typing import Any

import torch

# The columns of the table of misclassified digits (``misclassified_rows``), in order.
TABLE_COLUMNS = ("image", "label", "prediction", "top probabilities", "index")
TOP_K = 3


def top_classes(probabilities: torch.Tensor, k: int = TOP_K) -> str:
    """The ``k`` likeliest classes with their probabilities, likeliest first: ``"3: 81.2%, 5: 12.0%, 8: 4.1%"``."""
    values, classes = probabilities.float().topk(min(k, len(probabilities)))
    return ", ".join(f"{int(c)}: {100 * float(p):.1f}%" for p, c in zip(values, classes))


def misclassified_rows(examples: dict[str, torch.Tensor]) -> list[list[Any]]:
    """One row per misclassified digit, in ``TABLE_COLUMNS`` order: the 28 x 28 image (a uint8 numpy
    array, white on black as in the dataset), label, prediction, top probabilities ("" when the
    examples carry none) and the image's index in the evaluation set."""
    probabilities = examples.get("probabilities")
    return [
        [
            examples["images"][i].to(torch.uint8).numpy(),
            int(examples["label"][i]),
            int(examples["predicted"][i]),
            top_classes(probabilities[i]) if probabilities is not None else "",
            int(examples["index"][i]),
        ]
        for i in range(len(examples["images"]))
    ]


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


def final_charts(confusion: torch.Tensor, examples: dict[str, torch.Tensor], split: str) -> dict[str, Any]:
    """The end of a run as wandb shows it: confusion matrix, grid and table of misclassified digits, named
    by the split evaluated (``test/...``, or ``val/...`` on a validation hold-out)."""
    import wandb

    n = len(confusion)  # wandb's chart wants one (true, predicted) pair per image
    cells = torch.arange(n * n).repeat_interleave(confusion.flatten())
    grid = misclassified_grid(examples["images"], examples["predicted"], examples["label"])
    rows = [[wandb.Image(image), *rest] for image, *rest in misclassified_rows(examples)]
    return {
        f"{split}/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=(cells // n).tolist(), preds=(cells % n).tolist(), class_names=[str(c) for c in range(n)]
        ),
        f"{split}/misclassified": wandb.Image(grid, caption="predicted / true label"),
        f"{split}/misclassified_table": wandb.Table(columns=list(TABLE_COLUMNS), data=rows),
    }
