"""Recognise digits in real images with trained weights: the Python API behind ``mnist-dist predict``.

>>> from mnist_dist import Recognizer
>>> recognizer = Recognizer.load("runs/mnist/model.safetensors")
>>> recognizer.predict("photo.jpg").digit
7

Every input goes through :func:`mnist_dist.inference.preprocess.preprocess`, the same steps the
command line uses, so both see exactly what the model sees.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..model import MLP, hidden_sizes_from_state_dict
from ..runs import load_weights
from .images import ImageError
from .preprocess import preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The recognised digit, the model's probability for it, and the probability of each digit 0-9."""

    digit: int
    confidence: float
    probabilities: tuple[float, ...]

    def top(self, k: int) -> list[tuple[int, float]]:
        """The ``k`` most probable digits with their probabilities, best first."""
        ranked = sorted(range(len(self.probabilities)), key=lambda d: -self.probabilities[d])
        return [(d, self.probabilities[d]) for d in ranked[:k]]


@dataclass(frozen=True)
class FileResult:
    """What became of one file: a prediction and the 28x28 image the model saw, or the error that prevented one."""

    file: str
    prediction: Prediction | None = None
    error: ImageError | None = None
    seen: torch.Tensor | None = None

    @property
    def ok(self) -> bool:
        return self.prediction is not None


class Recognizer:
    """A trained MLP plus the preprocessing that turns real images into MNIST-like input."""

    def __init__(self, model: MLP) -> None:
        self.model = model.eval()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recognizer:
        """Build a recognizer from a ``model.safetensors`` file written by a training run."""
        state_dict = load_weights(path)
        try:
            model = MLP(hidden_sizes_from_state_dict(state_dict))
            model.load_state_dict(state_dict)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise WeightsError(f"{path} does not hold weights of this project's MLP ({exc})") from None
        return cls(model)

    def predict_tensors(self, images: torch.Tensor) -> list[Prediction]:
        """Predict for already preprocessed images ``(N, 28, 28)`` in one forward pass."""
        if images.shape[0] == 0:
            return []
        with torch.no_grad():
            probs = torch.softmax(self.model(images.float()), dim=1)
        confidence, digits = probs.max(dim=1)
        return [
            Prediction(int(d), float(c), tuple(float(p) for p in row)) for d, c, row in zip(digits, confidence, probs)
        ]

    def predict(self, image: Any) -> Prediction:
        """Recognise one image: a path, a PIL image, or an array (see :func:`preprocess`).

        Raises :class:`~mnist_dist.inference.images.ImageError` when the image cannot be read, and
        its subclass :class:`~mnist_dist.inference.preprocess.BlankImageError` when it holds no ink.
        """
        return self.predict_tensors(preprocess(image).unsqueeze(0))[0]

    def predict_batch(self, images: Sequence[Any]) -> list[Prediction]:
        """Recognise many images in one forward pass; raises on the first unusable one."""
        if not images:
            return []
        return self.predict_tensors(torch.stack([preprocess(image) for image in images]))

    def predict_files(self, paths: Iterable[str | os.PathLike]) -> list[FileResult]:
        """One result per image file, in order, all predicted in one forward pass.

        Directories are searched (see :func:`find_images`). A bad file yields its error
        and the others still run; a directory without images yields an error too.
        """
        found = find_images(paths)
        results = self.predict_inputs([(str(path), path) for path in found])
        return [
            FileResult(r.file, error=ImageError("no image files found in this directory", path)) if path.is_dir() else r
            for path, r in zip(found, results)
        ]

    def predict_inputs(self, inputs: Iterable[tuple[str, Any]]) -> list[FileResult]:
        """One result per ``(name, image)`` pair, in order, all predicted in one forward pass.

        ``image`` is anything :func:`preprocess` takes (a path, file bytes, a PIL image, an
        array). An input that cannot be used yields its error, named ``name``; the others still run.
        """
        results = [_prepared(name, image) for name, image in inputs]
        good = [i for i, r in enumerate(results) if r.seen is not None]
        if good:
            predictions = self.predict_tensors(torch.stack([results[i].seen for i in good]))
            for i, prediction in zip(good, predictions):
                results[i] = FileResult(results[i].file, prediction=prediction, seen=results[i].seen)
        return results


def _prepared(name: str, image: Any) -> FileResult:
    """``image`` preprocessed (``seen`` set, no prediction yet), or its error."""
    try:
        return FileResult(name, seen=preprocess(image))
    except ImageError as exc:
        return FileResult(name, error=exc if exc.path is not None else type(exc)(exc.reason, name))
    # An unforeseen failure on one input (a Pillow bug, a plugin's own exception type)
    # must not lose the results of all the others.
    except Exception as exc:
        log.debug("preprocessing %s failed", name, exc_info=True)
        return FileResult(name, error=ImageError(f"cannot process this image ({type(exc).__name__}: {exc})", name))


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand ``inputs`` to image files: files as given, directories searched recursively.

    Inside a directory, files whose suffix Pillow knows as an image format (or that have
    no suffix) are taken, hidden files and folders skipped. A path that does not exist,
    or a directory with no image in it, is kept so that it is reported, not dropped.
    """
    from PIL import Image

    suffixes = {s.lower() for s in Image.registered_extensions()}
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            found.append(item)
            continue
        inside = [
            path
            for path in sorted(item.rglob("*"))
            if path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(item).parts)
            and (path.suffix.lower() in suffixes or not path.suffix)
        ]
        found.extend(inside or [item])
    return found
