"""images: image files and arrays of any mode, format, bit depth and orientation are read as the digit they show."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import torch
from fuzzing import files_pillow_warns_about
from pictures import mnist_digits, on_paper, reference, similarity
from PIL import Image

from mnist_dist.inference.images import ImageError, as_image, open_image
from mnist_dist.inference.preprocess import preprocess


@pytest.fixture(scope="module")
def digits(mnist_test):
    return mnist_digits(mnist_test)


def _save(rgb: np.ndarray, mode: str, fmt: str, path):
    img = Image.fromarray(rgb)
    if mode == "L":
        img = img.convert("L")
    elif mode == "1":
        img = img.convert("L").point(lambda v: 255 if v > 128 else 0).convert("1")
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "LA":
        img = img.convert("LA")
    elif mode == "CMYK":
        img = img.convert("CMYK")
    elif mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    img.save(path, **({"quality": 85} if fmt in ("jpg", "webp") else {}))
    return path


CASES = [
    ("L", "png"),
    ("RGB", "png"),
    ("RGB", "jpg"),
    ("L", "jpg"),
    ("CMYK", "jpg"),
    ("RGB", "bmp"),
    ("P", "gif"),
    ("RGB", "webp"),
    ("RGBA", "png"),
    ("LA", "png"),
    ("P", "png"),
    ("1", "png"),
    ("I;16", "png"),
    ("RGB", "tiff"),
]


@pytest.mark.parametrize("mode,fmt", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_every_mode_and_format_gives_the_digit(digits, tmp_path, mode, fmt):
    digit = digits[1]
    path = _save(on_paper(digit, ink=(20, 30, 120), paper=(245, 240, 225)), mode, fmt, tmp_path / f"d.{fmt}")
    assert similarity(preprocess(path), reference(digit)) > 0.95


def test_palette_image_with_transparent_index(digits, tmp_path):
    digit = digits[3]
    img = Image.fromarray(on_paper(digit)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    background_index = img.getpixel((0, 0))
    img.save(tmp_path / "p.gif", transparency=background_index)
    assert Image.open(tmp_path / "p.gif").has_transparency_data
    assert similarity(preprocess(tmp_path / "p.gif"), reference(digit)) > 0.95


def test_exif_orientation_is_applied(digits, tmp_path):
    digit = digits[4]
    upright = on_paper(digit)
    # Stored rotated by 90 degrees, with the EXIF tag (6) telling viewers to rotate it back.
    stored = Image.fromarray(np.rot90(upright, k=1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert similarity(preprocess(tmp_path / "rot.jpg"), reference(digit)) > 0.95


def test_array_and_tensor_inputs(digits):
    digit = digits[9]
    page = on_paper(digit)
    as_float = torch.from_numpy(page).float() / 255
    assert torch.equal(preprocess(as_float), preprocess(Image.fromarray(page)))
    with pytest.raises(ImageError, match="not an image"):
        preprocess(np.zeros((4, 4, 7)))


def test_bad_files_say_what_is_wrong(tmp_path, digits):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("shopping list: milk\n")
    Image.fromarray(on_paper(digits[0])).save(tmp_path / "good.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:400])
    Image.new("L", (40, 40), 255).save(tmp_path / "blank.png")
    expected = {
        "empty.png": "file is empty",
        "notes.png": "not an image Pillow can read (cannot identify image file)",
        "cut.jpg": "image data is truncated or corrupt",
        "missing.png": "file does not exist",
        "blank.png": "no ink found (blank image)",
    }
    for name, reason in expected.items():
        with pytest.raises(ImageError) as info:
            preprocess(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: {reason}")
        assert info.value.path == str(tmp_path / name)
    with pytest.raises(ImageError, match="is a directory"):
        open_image(tmp_path)


def in_mode(rgb: np.ndarray, mode: str) -> Image.Image:
    """The page ``rgb`` as a PIL image of ``mode`` (for the modes Pillow cannot convert to, built by hand)."""
    img = Image.fromarray(rgb)
    gray = img.convert("L")
    if mode == "LAB":  # lightness from the gray level, neutral colour
        return Image.merge("LAB", [gray, Image.new("L", img.size, 128), Image.new("L", img.size, 128)])
    if mode == "La":  # premultiplied alpha; fully opaque here
        return Image.merge("La", [gray, Image.new("L", img.size, 255)])
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return gray.convert(mode)  # keeps the 0-255 values: 8-bit data in a 16/32-bit image
    if mode == "1":  # thresholded, not dithered
        return gray.point(lambda v: 255 if v > 128 else 0).convert("1")
    return img.convert(mode)


PILLOW_MODES = [
    "1",
    "L",
    "P",
    "RGB",
    "RGBA",
    "RGBX",
    "RGBa",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "LA",
    "La",
    "PA",
    "I",
    "F",
    "I;16",
    "I;16L",
    "I;16B",
    "I;16N",
]


@pytest.mark.parametrize("mode", PILLOW_MODES)
def test_every_pillow_mode_gives_the_digit(digits, mode):
    digit = digits[10]
    img = in_mode(on_paper(digit, ink=(20, 30, 120), paper=(245, 240, 225)), mode)
    assert img.mode == mode
    assert similarity(preprocess(img), reference(digit)) > 0.95


@pytest.mark.parametrize(
    "mode,full",
    [("I;16", 65535), ("I;16B", 65535), ("I", 65535), ("I;16", 4095), ("F", 1.0), ("F", 255.0), ("F", 65535.0)],
)
def test_high_bit_depth_data_is_scaled_by_its_bit_depth(digits, mode, full):
    digit = digits[11]
    gray = np.asarray(Image.fromarray(on_paper(digit)).convert("L"), np.float64) / 255
    values = gray * full
    if mode == "F":
        img = Image.fromarray(values.astype(np.float32), "F")
    elif mode == "I":
        img = Image.fromarray(values.round().astype(np.int32))
    else:  # built from raw bytes: Pillow's convert("I;16B") clips values to 255
        dtype = ">u2" if mode == "I;16B" else "<u2"
        img = Image.frombytes(mode, gray.shape[::-1], values.round().astype(dtype).tobytes())
    assert img.mode == mode
    assert similarity(preprocess(img), reference(digit)) > 0.95


def test_nan_pixels_of_a_float_image_are_refused():
    pixels = np.full((40, 40), 0.9, np.float32)
    pixels[10:30, 18:22] = np.nan
    with pytest.raises(ImageError) as info:
        preprocess(Image.fromarray(pixels, "F"))
    assert str(info.value) == "image holds NaN or infinite pixel values"


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("LAB", "tiff"),
        ("F", "tiff"),
        ("I;16", "png"),
        ("I;16B", "tiff"),
        ("CMYK", "tiff"),
        ("PA", "tiff"),
        ("YCbCr", "tiff"),
        ("I", "tiff"),
    ],
)
def test_modes_read_back_from_files(digits, tmp_path, mode, fmt):
    digit = digits[10]
    path = tmp_path / f"d.{fmt}"
    in_mode(on_paper(digit, ink=(20, 30, 120), paper=(245, 240, 225)), mode).save(path)
    assert Image.open(path).mode == mode
    assert similarity(preprocess(path), reference(digit)) > 0.95


def test_an_animated_gif_is_read_from_its_first_frame(digits, tmp_path):
    first, second = (Image.fromarray(on_paper(d)).convert("P") for d in (digits[0], digits[1]))
    first.save(tmp_path / "a.gif", save_all=True, append_images=[second], duration=200, loop=0)
    first.save(tmp_path / "a.png", save_all=True, append_images=[second], duration=200)  # APNG
    for name in ("a.gif", "a.png"):
        assert getattr(Image.open(tmp_path / name), "n_frames", 1) == 2
        out = preprocess(tmp_path / name)
        assert similarity(out, reference(digits[0])) > 0.95 and similarity(out, reference(digits[1])) < 0.9


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(digits, tmp_path, orientation):
    digit = digits[4]
    upright = Image.fromarray(on_paper(digit))
    # Stored as a camera would: turned so that the tag's transposition makes it upright again.
    T = Image.Transpose
    inverse = {
        2: T.FLIP_LEFT_RIGHT,
        3: T.ROTATE_180,
        4: T.FLIP_TOP_BOTTOM,
        5: T.TRANSPOSE,
        6: T.ROTATE_90,
        7: T.TRANSVERSE,
        8: T.ROTATE_270,
    }
    stored = upright.transpose(inverse[orientation]) if orientation > 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "o.jpg", exif=exif, quality=95)
    assert similarity(preprocess(tmp_path / "o.jpg"), reference(digit)) > 0.95


def malformed_exif(orientation: int) -> bytes:
    """An EXIF block whose TransferFunction tag (numbers by definition) holds text, as broken firmware writes.

    Pillow's own ``ImageOps.exif_transpose`` raises on it.
    """
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Camera maker"
    raw = bytearray(exif.tobytes())
    at = raw.find(b"\x01\x0f\x00\x02")  # big-endian tag 0x010F (Make), type ASCII
    raw[at : at + 2] = b"\x01\x2d"
    return bytes(raw)


def test_malformed_exif_is_ignored_or_used_as_far_as_it_goes(digits, tmp_path):
    from PIL import ImageOps

    digit = digits[4]
    upright = Image.fromarray(on_paper(digit))
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "broken.jpg", exif=malformed_exif(6), quality=95)
    with pytest.raises(struct.error):  # what Pillow's own exif_transpose does with it
        ImageOps.exif_transpose(Image.open(tmp_path / "broken.jpg"))
    assert similarity(preprocess(tmp_path / "broken.jpg"), reference(digit)) > 0.95  # orientation 6 still read
    for name, exif in {"garbage": b"Exif\x00\x00this is not TIFF data", "orientation 9": malformed_exif(9)}.items():
        upright.save(tmp_path / "x.jpg", exif=exif, quality=95)
        assert similarity(preprocess(tmp_path / "x.jpg"), reference(digit)) > 0.95, name


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64])
def test_integer_arrays_holding_0_to_255_read_as_8_bit(digits, dtype):
    # int8 holds at most 127: the MNIST digit itself, at half strength
    page = digits[9] // 2 if dtype == np.int8 else on_paper(digits[9])
    expected = preprocess(page)
    assert torch.equal(preprocess(page.astype(dtype)), expected)
    if dtype in (np.int16, np.int32, np.int64):
        assert torch.equal(preprocess(torch.from_numpy(page.astype(dtype))), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_tensors_of_any_precision_read_as_0_to_1(digits, dtype):
    page = Image.fromarray(on_paper(digits[9])).convert("L")
    as_float = torch.from_numpy(np.asarray(page).copy()).float() / 255
    assert similarity(preprocess(as_float.to(dtype)), preprocess(page)) > 0.99


@pytest.mark.parametrize(
    "array,message",
    [
        (np.full((8, 8), 1000, np.uint16), "integer array values must be 0-255, found 1000..1000"),
        (np.full((8, 8), -3, np.int32), "integer array values must be 0-255, found -3..-3"),
        (np.full((8, 8), 255.0), "float array values must be in [0, 1], found 255..255"),
        (np.full((8, 8), -0.5, np.float32), "float array values must be in [0, 1], found -0.5..-0.5"),
        (np.array([[0.5, np.nan], [0.1, 0.2]]), "array holds NaN or infinite values"),
        (np.array([[0.5, np.inf], [0.1, 0.2]]), "array holds NaN or infinite values"),
        (np.ones((8, 8), bool), "array of dtype bool is not an image"),
        (np.ones((8, 8), complex), "array of dtype complex128 is not an image"),
        (np.full((8, 8), None, object), "array of dtype object is not an image"),
        (np.full((8, 8), "7"), "array of dtype <U1 is not an image"),
        (torch.ones(8, 8, dtype=torch.bool), "array of dtype bool is not an image"),
        (torch.ones(8, 8, dtype=torch.complex64), "array of dtype complex64 is not an image"),
        (torch.full((8, 8), 300, dtype=torch.int64), "integer array values must be 0-255, found 300..300"),
    ],
    ids=[
        "uint16-1000",
        "negative",
        "float-255",
        "float-negative",
        "nan",
        "inf",
        "bool",
        "complex",
        "object",
        "strings",
        "tensor-bool",
        "tensor-complex",
        "tensor-int64-300",
    ],
)
def test_other_arrays_are_refused_saying_what_to_pass(array, message):
    with pytest.raises(ImageError) as info:
        preprocess(array)
    assert str(info.value).startswith(message)


def test_pillow_warns_about_no_file():
    """Pillow's warnings (metadata it skips, a possible decompression bomb) would print two lines each
    to stderr beside the one line a file gets: the file is read, or refused with its reason, silently."""
    (_, cut_exif), (_, huge) = files_pillow_warns_about()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert as_image(cut_exif).size == (96, 96)
        with pytest.raises(ImageError, match="image is too large"):
            as_image(huge)
    assert [str(w.message) for w in caught] == []
