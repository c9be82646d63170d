"""The grid of misclassified digits, drawn with Pillow alone (training sends it to wandb; the report saves it)."""

from __future__ import annotations

import torch


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
