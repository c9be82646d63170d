"""Turn a real picture of a digit into the 28x28 input the MLP was trained on.

MNIST was made by scaling each digit to fit a 20x20 box (keeping its aspect ratio,
anti-aliased) and placing it in a 28x28 frame so that its centre of mass sits at the
centre, bright ink on a black background. :func:`preprocess` repeats those steps on any
image Pillow can read, so photos, scans and drawings meet the model on its own terms:

1. orientation from EXIF applied; any mode (1, L, P, RGB, RGBA, 16-bit, ...) read as
   grayscale plus an alpha channel;
2. the background level is the median of the opaque border pixels (for a transparent
   border: the opposite of the drawing's own tone); a light background
   means dark ink, so the image is inverted to bright ink on dark;
3. ink = distance from the background, less the paper's grain (estimated from the
   border), scaled so that solid strokes reach 1.0; transparent pixels count as background.
   If nothing stands out by ``MIN_CONTRAST`` (and well above the grain), the image is
   blank (:class:`BlankImageError`): reported, never guessed;
4. the crop is the bounding box of the pixels holding at least ``INK_THRESHOLD`` ink,
   less small specks separated from the digit by empty space;
5. the crop is resized so its longer side is 20 pixels (aspect ratio kept, anti-aliased);
6. it is placed in a 28x28 frame with its centre of mass at pixel (14, 14), as in MNIST.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

FRAME = 28  # MNIST image side
BOX = 20  # side of the box MNIST scaled each digit into
CENTRE = 14.0  # where MNIST put the centre of mass (mean over the test set: 13.99, 14.01)
MAX_SIDE = 1024  # larger inputs are reduced first: bounded work, and a digit stays far above 20 px
BORDER = 0.02  # width of the ring of border pixels that gives the background, as a fraction of the side
MIN_CONTRAST = 0.1  # ink must differ from the background by this much (of full scale), else: blank
NOISE_SIGMAS = 6.0  # ... and by this many standard deviations of the border's noise
GRAIN_SIGMAS = 3.0  # differences from the background below this many standard deviations are not ink
INK_THRESHOLD = 0.25  # fraction of the strongest ink from which a pixel counts as ink
SPECK_MASS = 0.02  # ink groups at the edge of the crop holding less than this fraction are noise

MODES_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An input cannot be recognised; ``reason`` says why, ``path`` names the file if there is one."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(reason if path is None else f"{path}: {reason}")


class BlankImageError(ImageError):
    """The image holds no ink: nothing stands out from the background."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file fully, raising :class:`ImageError` that says what is wrong with it."""
    p = Path(path)
    if p.is_dir():
        raise ImageError("is a directory, not an image file", path)
    try:
        if p.stat().st_size == 0:
            raise ImageError("file is empty", path)
        img = Image.open(p)
    except FileNotFoundError:
        raise ImageError("file does not exist", path) from None
    except PermissionError:
        raise ImageError("cannot read file (permission denied)", path) from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (cannot identify image file)", path) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large ({exc})", path) from None
    except OSError as exc:
        if exc.errno is not None:  # the operating system's error, not Pillow's about the data
            raise ImageError(f"cannot read file ({exc.strerror})", path) from None
        raise ImageError(f"image data is truncated or corrupt ({exc})", path) from None
    try:
        img.load()
    # Pillow's format plugins raise many types (OSError, SyntaxError, struct.error, ...) for
    # broken data; whichever it is, the file is unusable and the message says why.
    except Exception as exc:
        raise ImageError(f"image data is truncated or corrupt ({exc})", path) from None
    return img


def as_image(image: Any) -> Image.Image:
    """Accept a path, a PIL image, or an array/tensor ``(H, W)``, ``(H, W, 3|4)`` (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
            raise ImageError(f"array of shape {image.shape} is not an image (expected (H, W) or (H, W, 3|4))")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(arr)
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def gray_and_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Return grayscale and alpha, both float32 ``(H, W)`` in [0, 1], for an image of any mode."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit files open as I;16 or I; 8-bit data may also arrive as I or F.
        full = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            full = 1.0
        gray = Image.fromarray((np.clip(arr / full, 0, 1) * 255).round().astype(np.uint8))
        alpha = None
    else:
        has_alpha = img.mode in MODES_WITH_ALPHA or (img.mode == "P" and img.has_transparency_data) or (
            img.mode in ("L", "RGB") and "transparency" in img.info
        )
        if has_alpha:
            rgba = img.convert("RGBA")
            gray, alpha = rgba.convert("L"), rgba.getchannel("A")
        else:
            gray, alpha = img.convert("L"), None
    factor = -(-max(gray.size) // MAX_SIDE)
    if factor > 1:
        gray = gray.reduce(factor)
        alpha = alpha.reduce(factor) if alpha is not None else None
    g = np.asarray(gray, dtype=np.float32) / 255.0
    a = np.ones_like(g) if alpha is None else np.asarray(alpha, dtype=np.float32) / 255.0
    return g, a


def ink_map(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Bright-on-dark ink in [0, 1]: distance from the background, transparent pixels as background.

    Raises :class:`BlankImageError` if no pixel stands out from the background by
    ``MIN_CONTRAST`` and by ``NOISE_SIGMAS`` times the noise of the border.
    """
    h, w = gray.shape
    ring = max(1, round(BORDER * min(h, w)))
    border = np.ones_like(gray, dtype=bool)
    border[ring:-ring, ring:-ring] = False
    opaque_border = border & (alpha > 0.5)
    noise = 0.0
    if opaque_border.sum() >= 0.5 * border.sum():
        background = float(np.median(gray[opaque_border]))
        # Robust standard deviation (from the median absolute deviation) of the paper's grain.
        noise = 1.4826 * float(np.median(np.abs(gray[opaque_border] - background)))
    else:
        # Mostly transparent surroundings: the opaque pixels are the drawing itself, so the
        # background is whatever contrasts with them (dark ink means a light background).
        weight = alpha.sum()
        if weight == 0:
            raise BlankImageError("no ink found (image is fully transparent)")
        background = 1.0 if float((gray * alpha).sum() / weight) < 0.5 else 0.0
    raw = (background - gray) if background >= 0.5 else (gray - background)
    raw = np.clip(raw, 0.0, 1.0) * alpha
    peak = float(raw.max())
    if peak < max(MIN_CONTRAST, NOISE_SIGMAS * noise):
        raise BlankImageError("no ink found (blank image)")
    # Solid strokes should reach 1.0 as in MNIST, whatever the pen, paper or lighting, and
    # the paper's grain should be 0, as MNIST's background is.
    strength = float(np.percentile(raw[raw >= INK_THRESHOLD * peak], 90))
    floor = min(GRAIN_SIGMAS * noise, 0.5 * strength)
    return np.clip((raw - floor) / (strength - floor), 0.0, 1.0)


def _span(profile: np.ndarray) -> tuple[int, int]:
    """First and last index of the main run of ``profile`` (ink per row or column).

    Runs at either end that are separated from the rest by empty rows/columns and hold
    less than ``SPECK_MASS`` of the ink are dust or noise, not part of the digit.
    """
    nz = np.flatnonzero(profile)
    runs = np.split(nz, np.flatnonzero(np.diff(nz) > 1) + 1)
    total = profile.sum()
    while len(runs) > 1 and profile[runs[0]].sum() < SPECK_MASS * total:
        runs.pop(0)
    while len(runs) > 1 and profile[runs[-1]].sum() < SPECK_MASS * total:
        runs.pop()
    return int(runs[0][0]), int(runs[-1][-1])


def crop_to_ink(ink: np.ndarray) -> np.ndarray:
    """Cut ``ink`` to the bounding box of its ink pixels (those reaching ``INK_THRESHOLD``)."""
    mask = ink >= INK_THRESHOLD
    if not mask.any():
        raise BlankImageError("no ink found (blank image)")
    top, bottom = _span(mask.sum(axis=1))
    left, right = _span(mask.sum(axis=0))
    return ink[top : bottom + 1, left : right + 1]


def fit_and_centre(crop: np.ndarray) -> np.ndarray:
    """Scale ``crop`` to fit a 20x20 box (aspect kept) and centre its mass in a 28x28 frame."""
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # LANCZOS widens its kernel when shrinking, so strokes are anti-aliased, not aliased away.
    digit = np.asarray(Image.fromarray(crop.astype(np.float32)).resize(size, Image.Resampling.LANCZOS))
    digit = np.clip(digit, 0.0, 1.0)
    mass = digit.sum()
    if mass == 0:
        raise BlankImageError("no ink found (blank image)")
    rows, cols = np.indices(digit.shape)
    top = round(CENTRE - float((rows * digit).sum() / mass))
    left = round(CENTRE - float((cols * digit).sum() / mass))
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    # A lopsided digit can be shifted partly out of the frame; keep only what lands inside.
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + digit.shape[0], FRAME), min(left + digit.shape[1], FRAME)
    frame[r0:r1, c0:c1] = digit[r0 - top : r1 - top, c0 - left : c1 - left]
    return frame


def preprocess(image: Any) -> torch.Tensor:
    """Return what the model sees for ``image``: float32 ``(28, 28)`` in [0, 1], bright ink on black.

    ``image`` is a path, a PIL image or an array (see :func:`as_image`). The steps are in
    this module's docstring. Raises :class:`ImageError` for an unreadable file and
    :class:`BlankImageError` when there is no ink.
    """
    path = image if isinstance(image, (str, os.PathLike)) else None
    try:
        gray, alpha = gray_and_alpha(as_image(image))
        return torch.from_numpy(fit_and_centre(crop_to_ink(ink_map(gray, alpha))))
    except ImageError as exc:
        if exc.path is None and path is not None:
            raise type(exc)(exc.reason, path) from None
        raise
