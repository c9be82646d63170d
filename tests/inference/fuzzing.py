"""Property-based fuzzing for the inference tests: how many cases, which seed, and broken image files.

Every fuzz test tries ``EXAMPLES`` cases (``FUZZ_EXAMPLES``, default 50) from the fixed seed
``SEED`` (``FUZZ_SEED``), so a failure in CI happens again on any machine; a failing example
is printed with the seed and the count that found it. To fuzz longer:
``FUZZ_EXAMPLES=5000 FUZZ_SEED=7 pytest tests/inference -k fuzz``.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from hypothesis import HealthCheck, currently_in_test_context, note, seed, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
SEED = int(os.environ.get("FUZZ_SEED", "20261203"))
CALL_SECONDS = 20.0  # one call (a request, a file) that takes longer than this counts as a hang

T = TypeVar("T")


def fuzz(test: Callable) -> Callable:
    """``test`` (a hypothesis ``@given`` function) run ``EXAMPLES`` times from ``SEED``, shrinking kept.

    No example database (nothing written to the checkout) and no per-example deadline: a hang is
    caught by :func:`bounded` instead, which does not flake when the machine is busy.
    """
    configured = settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(test)
    return seed(SEED)(configured)


def bounded(call: Callable[[], T], seconds: float = CALL_SECONDS) -> T:
    """``call()``'s value; fails the test if it has not returned within ``seconds`` (a hang)."""
    if currently_in_test_context():
        note(f"reproduce with FUZZ_SEED={SEED} FUZZ_EXAMPLES={EXAMPLES}")
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call).result(timeout=seconds)
    except FutureTimeout:
        raise AssertionError(f"the call did not return within {seconds:g} s (a hang?)") from None
    finally:
        pool.shutdown(wait=False)


def _drawn_digit() -> Image.Image:
    """A 7 in dark ink on light paper, 96x96: a picture the model can read."""
    img = Image.new("RGB", (96, 96), (240, 236, 228))
    ImageDraw.Draw(img).line([(20, 20), (76, 20), (40, 84)], fill=(20, 20, 60), width=9)
    return img


def _encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def seed_files() -> dict[str, bytes]:
    """The same drawn digit as real files of several formats: what the mutations start from."""
    img = _drawn_digit()
    return {
        "png": _encoded(img, "PNG"),
        "png-gray": _encoded(img.convert("L"), "PNG"),
        "jpeg": _encoded(img, "JPEG", quality=80),
        "gif": _encoded(img.convert("P"), "GIF"),
        "bmp": _encoded(img, "BMP"),
        "webp": _encoded(img, "WEBP"),
        "tiff": _encoded(img, "TIFF"),
    }


SEEDS = seed_files()


@st.composite
def mutated(draw) -> bytes:
    """A real image file, then one to four mutations: truncated, bits flipped, bytes overwritten,
    inserted or deleted, or its head spliced onto another format's tail."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "splice"]))
        at = draw(st.integers(1, max(len(data) - 1, 1)))  # never at 0: an empty file has its own test
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "splice":
            other = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
            data = data[:at] + other[draw(st.integers(0, len(other) - 1)) :]
    return bytes(data)


def image_bytes() -> st.SearchStrategy[bytes]:
    """Bytes a user might upload as an image: mostly broken real files, some random, some intact."""
    return st.one_of(mutated(), st.binary(min_size=1, max_size=4096), st.sampled_from(sorted(SEEDS.values())))


def broken_files(count: int) -> list[tuple[str, bytes]]:
    """``count`` broken image files, the same on every run: real files of each format truncated,
    with bytes flipped, or replaced by random bytes; named ``NN-how.format``."""
    rng = random.Random(SEED)
    files = []
    for n in range(count):
        fmt = sorted(SEEDS)[n % len(SEEDS)]
        data = bytearray(SEEDS[fmt])
        how = ("truncated", "flipped", "random")[(n // len(SEEDS)) % 3]
        if how == "truncated":
            del data[rng.randrange(1, len(data)) :]
        elif how == "flipped":
            for at in rng.sample(range(len(data)), 8):
                data[at] ^= 0xFF
        else:
            data = bytearray(rng.randbytes(rng.randrange(1, 2048)))
        files.append((f"{n:02d}-{how}.{fmt.split('-')[0]}", bytes(data)))
    return files


def files_pillow_warns_about() -> list[tuple[str, bytes]]:
    """Files on which Pillow warns (to stderr, two lines each) before they are read or refused:
    a JPEG whose EXIF block is cut short ("Corrupt EXIF data"), and a 10000x10000 PNG (over
    Pillow's decompression-bomb warning threshold, and over our 64 megapixels)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    cut_exif = _encoded(_drawn_digit(), "JPEG", exif=exif.tobytes()[:14])
    return [("cut-exif.jpg", cut_exif), ("huge.png", _encoded(Image.new("1", (10_000, 10_000)), "PNG"))]
