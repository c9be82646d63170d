"""Turn a real picture of a digit into the 28x28 input the MLP was trained on.

MNIST was made by scaling each digit to fit a 20x20 box (keeping its aspect ratio,
anti-aliased) and placing it in a 28x28 frame so that its centre of mass sits at the
centre, bright ink on a black background. :func:`preprocess` repeats those steps on any
image Pillow can read, so photos, scans and drawings meet the model on its own terms:

1. the image is read as grayscale plus an alpha channel (:mod:`.images`: the first frame
   of an animated file, upright as its EXIF says, any Pillow mode);
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
from typing import Any

import numpy as np
import torch
from PIL import Image

from .images import ImageError, as_image, gray_and_alpha

FRAME = 28  # MNIST image side
BOX = 20  # side of the box MNIST scaled each digit into
CENTRE = 14.0  # where MNIST put the centre of mass (mean over the test set: 13.99, 14.01)
BORDER = 0.02  # width of the ring of border pixels that gives the background, as a fraction of the side
MIN_CONTRAST = 0.1  # ink must differ from the background by this much (of full scale), else: blank
NOISE_SIGMAS = 6.0  # ... and by this many standard deviations of the border's noise
GRAIN_SIGMAS = 3.0  # differences from the background below this many standard deviations are not ink
INK_THRESHOLD = 0.25  # fraction of the strongest ink from which a pixel counts as ink
SPECK_MASS = 0.02  # ink groups at the edge of the crop holding less than this fraction are noise


class BlankImageError(ImageError):
    """The image holds no ink: nothing stands out from the background."""


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

    ``image`` is a path, file bytes, a PIL image or an array (see :func:`as_image`). The steps are in
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
