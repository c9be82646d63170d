"""Read any image a user has into grayscale and alpha: a file, its bytes, a PIL image, an array or a tensor.

- a file's first frame (of an animated GIF, say), fully loaded and the file closed after;
- turned upright as its EXIF orientation says (malformed EXIF is ignored);
- any Pillow mode (1, L, P, RGB, RGBA, CMYK, LAB, La, 16-bit, 32-bit float, ...) read as
  8-bit grayscale plus an alpha channel, high bit depths scaled by their bit depth;
- bounded: more than ``MAX_PIXELS`` pixels is refused, more than ``MAX_SIDE`` is reduced.

Everything that cannot be read is an :class:`ImageError` whose ``reason`` says what is wrong;
Pillow's own warnings about a file (metadata it skips, a possible decompression bomb) are
silenced, so that a file is one line (its result, or what is wrong), never more.
:mod:`.preprocess` turns what this returns into what the model sees.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import ExifTags, Image

MAX_SIDE = 1024  # larger inputs are reduced first: bounded work, and a digit stays far above 20 px
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
    _quiet_pillow()
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


def _quiet_pillow() -> None:
    """Silence Pillow's warnings, process-wide: each would print two lines on stderr beside the one
    line a file gets. (A filter, not ``catch_warnings``, which is not safe in the server's threads.)"""
    warnings.filterwarnings("ignore", module=r"PIL\.")  # adding the same filter again replaces it


def upright(img: Image.Image) -> Image.Image:
    """A copy of ``img`` turned as its EXIF orientation tag says; with malformed EXIF, as stored.

    The orientation metadata is dropped from a turned copy, so turning it again is a no-op.
    """
    _quiet_pillow()
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
