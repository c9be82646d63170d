"""Recognizer and ``mnist-dist predict``: real image files in, digits out, bad files reported."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from fuzzing import bounded, fuzz, image_bytes
from hypothesis import given
from PIL import Image

from mnist_dist.cli import main
from mnist_dist.data.idx import load_split
from mnist_dist.data.sources import DATASETS, raw_dir
from mnist_dist.inference.preprocess import BlankImageError
from mnist_dist.inference.recognize import Prediction, Recognizer, find_images
from mnist_dist.inference.results import report
from mnist_dist.model import MLP
from mnist_dist.runs import save_weights

# --- fixtures (data_dir and mnist_test come from conftest.py) --------------------------------

REALISTIC_COUNT = 1000


@pytest.fixture(scope="module")
def weights(data_dir, tmp_path_factory) -> Path:
    """model.safetensors of an MLP trained two shuffled epochs (about 97% accurate, a few seconds).

    Not conftest's ``trained_weights``: its single unshuffled pass ends biased towards the
    last batches, and its borderline predictions flip too easily to judge preprocessing by.
    """
    images, labels = load_split(raw_dir(data_dir, DATASETS["mnist"]), "mnist", "train")
    x = images.float() / 255
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for lr in (0.5, 0.1):
        opt.param_groups[0]["lr"] = lr
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), labels[batch]).backward()
            opt.step()
    path = tmp_path_factory.mktemp("recognize") / "model.safetensors"
    save_weights(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def recognizer(weights) -> Recognizer:
    return Recognizer.load(weights)


def realistic(digit: np.ndarray, rng: random.Random) -> Image.Image:
    """An MNIST digit as a user's picture: dark ink on light paper, enlarged 2-6x, padded off-centre, RGB."""
    side = round(28 * rng.uniform(2, 6))
    amount = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC), np.float64) / 255
    margins = [rng.randint(0, side) for _ in range(4)]
    amount = np.pad(amount, ((margins[0], margins[1]), (margins[2], margins[3])))[..., None]
    ink = np.array([rng.randint(0, 60), rng.randint(0, 60), rng.randint(0, 140)], float)
    paper = np.array([rng.randint(215, 255)] * 3, float)
    return Image.fromarray(np.clip(paper * (1 - amount) + ink * amount, 0, 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def realistic_files(mnist_test, tmp_path_factory):
    """``REALISTIC_COUNT`` MNIST test digits saved as realistic RGB PNG and JPEG files; returns (paths, indices)."""
    images, _ = mnist_test
    rng = random.Random(0)
    indices = rng.sample(range(len(images)), REALISTIC_COUNT)
    folder = tmp_path_factory.mktemp("realistic")
    paths = []
    for n, i in enumerate(indices):
        path = folder / (f"{i:05d}.png" if n % 2 else f"{i:05d}.jpg")
        realistic(images[i].numpy(), rng).save(path, **({} if n % 2 else {"quality": 85}))
        paths.append(path)
    return paths, indices


@pytest.fixture()
def mixed_dir(tmp_path, mnist_test):
    """A folder with two good images, a text file named .png, an empty file and a blank image."""
    images, _ = mnist_test
    rng = random.Random(1)
    realistic(images[0].numpy(), rng).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    realistic(images[1].numpy(), rng).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "notes.png").write_text("not a picture\n")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (80, 60), (250, 250, 250)).save(tmp_path / "blank.png")
    return tmp_path


# --- Recognizer ------------------------------------------------------------------------------


def test_realistic_files_get_the_predictions_of_the_original_28x28_images(recognizer, realistic_files, mnist_test):
    paths, indices = realistic_files
    images, _ = mnist_test
    results = recognizer.predict_files(paths)
    assert all(r.ok for r in results)
    on_files = torch.tensor([r.prediction.digit for r in results])
    with torch.no_grad():
        on_originals = recognizer.model(images[indices].float() / 255).argmax(1)
    agreement = float((on_files == on_originals).float().mean())
    assert agreement >= 0.98, f"predictions agree on {agreement:.1%} of images"


def test_predict_accepts_paths_pil_images_and_arrays(recognizer, realistic_files):
    path = realistic_files[0][0]
    from_path = recognizer.predict(path)
    assert recognizer.predict(str(path)) == from_path
    assert recognizer.predict(Image.open(path)) == from_path
    assert recognizer.predict(np.asarray(Image.open(path))) == from_path


def test_prediction_fields_are_consistent(recognizer, realistic_files):
    p = recognizer.predict(realistic_files[0][1])
    assert isinstance(p, Prediction) and len(p.probabilities) == 10
    assert sum(p.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert p.digit == int(np.argmax(p.probabilities)) and p.confidence == max(p.probabilities)
    top = p.top(3)
    assert top[0] == (p.digit, p.confidence) and [x for _, x in top] == sorted([x for _, x in top], reverse=True)


def test_batch_prediction_matches_one_at_a_time(recognizer, realistic_files):
    paths = realistic_files[0][:20]
    batch = recognizer.predict_batch(paths)
    for path, p in zip(paths, batch):
        single = recognizer.predict(path)
        assert single.digit == p.digit and single.confidence == pytest.approx(p.confidence, abs=1e-6)
    assert recognizer.predict_batch([]) == []


def test_blank_image_is_reported_not_guessed(recognizer):
    with pytest.raises(BlankImageError, match="no ink found"):
        recognizer.predict(Image.new("L", (50, 50), 255))


def test_predict_files_reports_each_bad_file_and_goes_on(recognizer, mixed_dir):
    results = {r.file: r for r in recognizer.predict_files([mixed_dir, mixed_dir / "missing.png"])}
    assert results[str(mixed_dir / "a.png")].ok and results[str(mixed_dir / "sub" / "b.jpg")].ok
    reasons = {
        name: results[str(mixed_dir / name)].error.reason
        for name in ("notes.png", "empty.png", "blank.png", "missing.png")
    }
    assert reasons == {
        "notes.png": "not an image Pillow can read (cannot identify image file)",
        "empty.png": "file is empty",
        "blank.png": "no ink found (blank image)",
        "missing.png": "file does not exist",
    }


def test_find_images_searches_folders_and_keeps_what_it_cannot_use(tmp_path):
    (tmp_path / "d" / "deeper").mkdir(parents=True)
    for name in ("d/x.PNG", "d/deeper/y.webp", "d/scan", "d/readme.txt", "d/.hidden.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty_dir").mkdir()
    found = find_images([tmp_path / "d", tmp_path / "empty_dir", tmp_path / "nope.png", tmp_path / "d/readme.txt"])
    assert found == [
        tmp_path / "d/deeper/y.webp",
        tmp_path / "d/scan",
        tmp_path / "d/x.PNG",
        tmp_path / "empty_dir",
        tmp_path / "nope.png",
        tmp_path / "d/readme.txt",
    ]


def test_a_folder_without_images_is_an_error(recognizer, tmp_path):
    (result,) = recognizer.predict_files([tmp_path])
    assert not result.ok and result.error.reason == "no image files found in this directory"


def test_load_rejects_missing_and_foreign_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Recognizer.load(tmp_path / "none.safetensors")
    save_weights({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not hold weights of this project's MLP"):
        Recognizer.load(tmp_path / "other.safetensors")


def test_load_rebuilds_the_saved_architecture(tmp_path):
    model = MLP(hidden_sizes=(32, 16))
    save_weights(model.state_dict(), tmp_path / "m.safetensors")
    assert Recognizer.load(tmp_path / "m.safetensors").model.hidden_sizes == (32, 16)


def test_recognizer_is_importable_from_the_package():
    from mnist_dist import Recognizer as exported

    assert exported is Recognizer


# --- mnist-dist predict ----------------------------------------------------------------------


# --- every Pillow mode in one folder; one bad input never loses the others ---------------------


@pytest.fixture()
def every_mode_dir(tmp_path, mnist_test):
    """A folder of one MNIST test digit saved in every hard mode: LAB, 16-bit, float, CMYK, palette with
    transparency, animated GIF, EXIF orientation, malformed EXIF; plus two broken files."""
    images, labels = mnist_test
    page = realistic(images[0].numpy(), random.Random(2))
    gray = page.convert("L")
    saved = {
        "lab.tif": Image.merge("LAB", [gray, Image.new("L", gray.size, 128), Image.new("L", gray.size, 128)]),
        "16bit.png": Image.fromarray(np.asarray(gray).astype(np.uint16) * 257),
        "8bit-in-16.png": gray.convert("I;16"),
        "float.tif": Image.fromarray(np.asarray(gray, np.float32) / 255, "F"),
        "cmyk.jpg": page.convert("CMYK"),
        "cmyk.tif": page.convert("CMYK"),
    }
    for name, img in saved.items():
        img.save(tmp_path / name)
    palette = page.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "transparent.png", transparency=palette.getpixel((0, 0)))
    palette.save(tmp_path / "animated.gif", save_all=True, append_images=[Image.new("P", page.size)], loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    page.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif-rotated.jpg", exif=exif)
    page.save(tmp_path / "exif-garbage.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01\x12")
    (tmp_path / "notes.png").write_text("not a picture\n")
    (tmp_path / "nan.tif").write_bytes(_tiff_bytes(Image.fromarray(np.full((20, 20), np.nan, np.float32), "F")))
    return tmp_path, int(labels[0])


def _tiff_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "TIFF")
    return buf.getvalue()


def test_predict_reads_every_mode_and_reports_each_bad_file(recognizer, every_mode_dir):
    folder, label = every_mode_dir
    results = {Path(r.file).name: r for r in recognizer.predict_files([folder])}
    bad = {name: r.error.reason for name, r in results.items() if not r.ok}
    assert bad == {
        "notes.png": "not an image Pillow can read (cannot identify image file)",
        "nan.tif": "image holds NaN or infinite pixel values",
    }
    digits = {name: r.prediction.digit for name, r in results.items() if r.ok}
    assert len(digits) == 10 and set(digits.values()) == {label}, digits


def test_predict_command_over_every_mode(weights, every_mode_dir):
    folder, label = every_mode_dir
    result = CliRunner().invoke(main, ["predict", "--weights", str(weights), "--json", str(folder)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(objects) == 10 and {o["digit"] for o in objects} == {label}
    assert result.stderr.splitlines()[-1] == "2 of 12 files could not be recognised"


def test_an_unforeseen_failure_of_one_input_is_its_error_only(recognizer, realistic_files, tmp_path):
    good = realistic_files[0][0]
    Image.open(good).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:-200])
    lazy = Image.open(tmp_path / "cut.png")  # opened by the caller, not loaded: fails only when read
    whole = (tmp_path / "whole.png").read_bytes()
    results = recognizer.predict_inputs([("first", good), ("lazy", lazy), ("bytes", whole)])
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].file == "lazy" and results[1].error.reason.startswith("cannot process this image (OSError:")
    assert results[0].prediction == results[2].prediction and results[0].seen.shape == (28, 28)


def test_fuzz_predict_files_with_broken_image_files(recognizer, tmp_path_factory, capsys):
    """What ``mnist-dist predict`` runs, on truncated, bit-flipped and random files (tests/inference/fuzzing.py):
    each file is a prediction or one ``FILE: reason`` line on stderr; never an exception, never a hang."""
    path = tmp_path_factory.mktemp("fuzz") / "upload.png"

    @fuzz
    @given(data=image_bytes())
    def one_result_per_file(data):
        path.write_bytes(data)
        (result,) = bounded(lambda: recognizer.predict_files([path]))
        assert result.file == str(path) and (result.ok or str(result.error).startswith(f"{path}: "))
        report([result], as_json=False, top_k=None)
        out, err = capsys.readouterr()
        expected = [] if result.ok else [str(result.error), "1 of 1 files could not be recognised"]
        assert err.splitlines() == expected and len(out.splitlines()) == (2 if result.ok else 0)

    one_result_per_file()
