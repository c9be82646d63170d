"""Turn a real picture of a digit into the 28x28 input the MLP was trained on.

MNIST was made by scaling each digit to fit a 20x20 box (keeping its aspect ratio,
anti-aliased) and placing it in a 28x28 frame so that its centre of mass sits at the
centre, bright ink on a black background. :func:`preprocess` repeats those steps on any
image Pillow can read, so photos, scans and drawings meet the model on its own terms:

1. the first frame of an animated file, turned upright as its EXIF orientation says
   (malformed EXIF is ignored); any Pillow mode (1, L, P, RGB, RGBA, CMYK, LAB, La,
   16-bit, 32-bit float, ...) read as grayscale plus an alpha channel;
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

import io
import logging
import os
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import ExifTags, Image

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

MAX_PIXELS = 64_000_000  # larger images are refused: a small compressed file can decode to gigabytes
FLOAT_SLACK = 1e-6  # float arrays may exceed [0, 1] by rounding error this small

MODES_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
FULL_SCALES = (255.0, 4095.0, 65535.0)  # 8-, 12- and 16-bit data in integer and float modes

# EXIF orientation tag value -> the transposition that makes the image upright
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

log = logging.getLogger(__name__)


class ImageError(ValueError):
    """An input cannot be recognised; ``reason`` says why, ``path`` names the file if there is one."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(reason if path is None else f"{path}: {reason}")


class BlankImageError(ImageError):
    """The image holds no ink: nothing stands out from the background."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file (its first frame, upright), raising :class:`ImageError` that says what is wrong."""
    p = Path(path)
    if p.is_dir():
        raise ImageError("is a directory, not an image file", path)
    try:
        if p.stat().st_size == 0:
            raise ImageError("file is empty", path)
    except FileNotFoundError:
        raise ImageError("file does not exist", path) from None
    except PermissionError:
        raise ImageError("cannot read file (permission denied)", path) from None
    return decode_image(p, path)


def decode_image(source: str | os.PathLike | IO[bytes], name: str | os.PathLike | None = None) -> Image.Image:
    """Decode the first frame of an image file or stream, upright, fully loaded; the file is closed after.

    Raises :class:`ImageError` (naming ``name``) for data Pillow cannot read and for images
    of more than ``MAX_PIXELS`` pixels.
    """
    try:
        with Image.open(source) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(
                    f"image is too large ({img.width}x{img.height} pixels, at most {MAX_PIXELS // 10**6} megapixels)",
                    name,
                )
            img.load()  # the first frame: Image.open starts there
            return upright(img)
    except FileNotFoundError:
        raise ImageError("file does not exist", name) from None
    except PermissionError:
        raise ImageError("cannot read file (permission denied)", name) from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (cannot identify image file)", name) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large ({exc})", name) from None
    except ImageError:
        raise
    except OSError as exc:
        if exc.errno is not None:  # the operating system's error, not Pillow's about the data
            raise ImageError(f"cannot read file ({exc.strerror})", name) from None
        raise ImageError(f"image data is truncated or corrupt ({exc})", name) from None
    # Pillow's format plugins raise many types (SyntaxError, struct.error, ValueError, ...) for
    # broken data; whichever it is, the file is unusable and the message says why.
    except Exception as exc:
        raise ImageError(f"image data is truncated or corrupt ({exc})", name) from None


def upright(img: Image.Image) -> Image.Image:
    """A copy of ``img`` turned as its EXIF orientation tag says; with malformed EXIF, as stored.

    The orientation metadata is dropped from a turned copy, so turning it again is a no-op.
    """
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    # Broken EXIF blocks make Pillow raise struct.error, TypeError, ValueError, ...: the pixels
    # themselves are fine, so the image is used as it is stored.
    except Exception as exc:
        log.debug("ignoring malformed EXIF data (%s)", exc)
        orientation = 1
    method = TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return img.copy()
    turned = img.transpose(method)
    for key in ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"):
        turned.info.pop(key, None)
    return turned


def as_image(image: Any) -> Image.Image:
    """An upright PIL image from a path, file bytes, a PIL image, or an array/tensor (see :func:`array_image`)."""
    if isinstance(image, Image.Image):
        return upright(image)
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ImageError("file is empty")
        return decode_image(io.BytesIO(image))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        # numpy has no bfloat16: any float tensor is read as float32 (values are checked after).
        image = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    if isinstance(image, np.ndarray):
        return array_image(image)
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def array_image(arr: np.ndarray) -> Image.Image:
    """An array ``(H, W)``, ``(H, W, 1|3|4)`` as a PIL image: integers 0-255, or floats in [0, 1].

    Anything else (values outside those ranges, NaN, bool, complex, strings, objects) is
    an :class:`ImageError` that says what to pass instead.
    """
    shape = arr.shape
    if arr.ndim == 3 and shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and shape[2] not in (3, 4)) or arr.size == 0:
        raise ImageError(f"array of shape {shape} is not an image (expected (H, W) or (H, W, 3|4))")
    kind = arr.dtype.kind
    if kind in "ui":
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 255:
            raise ImageError(
                f"integer array values must be 0-255, found {low}..{high} "
                "(scale 16-bit data to 0-255, or pass floats in [0, 1])"
            )
        return Image.fromarray(arr.astype(np.uint8))
    if kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError("array holds NaN or infinite values")
        low, high = float(arr.min()), float(arr.max())
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            raise ImageError(
                f"float array values must be in [0, 1], found {low:g}..{high:g} (divide 0-255 data by 255)"
            )
        return Image.fromarray((np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8))
    raise ImageError(f"array of dtype {arr.dtype} is not an image (pass integers 0-255, or floats in [0, 1])")


def _high_depth_gray(img: Image.Image) -> Image.Image:
    """8-bit grayscale from a 16/32-bit integer or float image, scaled by the data's bit depth."""
    arr = np.asarray(img, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ImageError("image holds NaN or infinite pixel values")
    peak = float(arr.max(initial=0))
    if img.mode == "F" and peak <= 1.0:
        full = 1.0
    else:  # 8-bit data is often stored in 16-bit files (Pillow's own convert("I;16") does so)
        full = next((scale for scale in FULL_SCALES if peak <= scale), peak)
    return Image.fromarray((np.clip(arr / full, 0, 1) * 255).round().astype(np.uint8))


def _gray_and_alpha_images(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    if img.mode in HIGH_DEPTH_MODES:
        return _high_depth_gray(img), None
    if img.mode == "LAB":  # the lightness channel is the gray level; Pillow cannot convert LAB
        return img.getchannel("L"), None
    if img.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
        img = img.convert("LA")
    if img.mode == "LA":
        return img.getchannel("L"), img.getchannel("A")
    has_alpha = (
        img.mode in MODES_WITH_ALPHA
        or (img.mode == "P" and img.has_transparency_data)
        or (img.mode in ("L", "RGB") and "transparency" in img.info)
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        return rgba.convert("L"), rgba.getchannel("A")
    return img.convert("L"), None


def gray_and_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Return grayscale and alpha, both float32 ``(H, W)`` in [0, 1], for an (upright) image of any mode."""
    try:
        gray, alpha = _gray_and_alpha_images(img)
    except ImageError:
        raise
    except (ValueError, OSError) as exc:  # a mode or palette Pillow cannot convert
        raise ImageError(f"cannot read the pixels of a {img.mode} image ({exc})") from None
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
