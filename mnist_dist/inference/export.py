"""Export trained weights for use without this package: TorchScript, or ONNX when its packages are there.

The exported model maps float images ``(N, 28, 28)`` in [0, 1], bright ink on black (the
output of :func:`mnist_dist.inference.preprocess.preprocess`), to logits ``(N, 10)``, for any N.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import warnings
from pathlib import Path

import torch

from ..errors import ExportError, OutputPathError
from ..model import MLP
from ..runs import atomic_write_bytes, check_output, weights_file

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
# The file names each format is written under: `run_exported` tells them apart by the suffix.
SUFFIXES = {"torchscript": (".pt", ".ts", ".torchscript"), "onnx": (".onnx",)}
# torch.onnx.export (the torch.export-based exporter, the default since torch 2.9) needs these.
ONNX_PACKAGES = ("onnx", "onnxscript")
TOLERANCE = 1e-4  # float32 round-off between runtimes, far below any change of prediction


def default_output(weights: str | os.PathLike, fmt: str) -> Path:
    """Where an export goes unless told otherwise: beside the weights, e.g. ``model.pt``."""
    return weights_file(weights).with_suffix(FORMATS[fmt])


def check_suffix(output: Path, fmt: str) -> None:
    """Refuse an output whose suffix is not one of format ``fmt``'s (a .onnx file of TorchScript)."""
    suffix = output.suffix.lower()
    if suffix in SUFFIXES[fmt]:
        return
    named = f"ends in {output.suffix!r}" if output.suffix else "has no suffix"
    other = [f for f, suffixes in SUFFIXES.items() if suffix in suffixes]
    switch = f", or use --format {other[0]}" if other else ""
    *first, last = SUFFIXES[fmt]
    listed = f"{', '.join(first)} or {last}" if first else last
    raise OutputPathError(
        f"--output {output} {named}, but {fmt} files end in {listed}; "
        f"name it e.g. --output {output.with_suffix(FORMATS[fmt])}{switch}"
    )


def _example() -> torch.Tensor:
    # Batch of 2, not 1: tracing then cannot mistake the batch size for a constant.
    return torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(0))


def export_torchscript(model: MLP, output: Path) -> None:
    """Trace ``model`` and save it with ``torch.jit.save`` (load with ``torch.jit.load``)."""
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but still what many deployments load; asked for by name.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model.eval(), _example())
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    atomic_write_bytes(output, buffer.getvalue())


def missing_onnx_packages() -> list[str]:
    """The packages ONNX export needs that are not installed (empty when it can run)."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def export_onnx(model: MLP, output: Path) -> None:
    """Export ``model`` to ONNX with a dynamic batch dimension (input ``images``, output ``logits``)."""
    missing = missing_onnx_packages()
    if missing:
        raise ExportError(
            f"ONNX export needs the Python package(s) {', '.join(missing)}, which are not installed; "
            f"install with: pip install {' '.join(missing)} (or use --format torchscript)"
        )
    batch = torch.export.Dim("batch", min=1)
    # Written beside the target, then renamed: a failed export never leaves a partial file.
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        # The exporter reports its progress on stdout and warns about internals we cannot change.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(),
                (_example(),),
                str(tmp),
                dynamo=True,
                external_data=False,
                verbose=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
            )
        os.replace(tmp, output)
    except Exception as exc:
        raise ExportError(f"ONNX export failed with the installed packages ({type(exc).__name__}: {exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def export_model(weights: str | os.PathLike, fmt: str, output: str | os.PathLike | None = None) -> Path:
    """Load ``weights`` and write them in format ``fmt`` (``torchscript`` or ``onnx``); return the file.

    The output is checked before anything is read or written: never the weights themselves
    or another file of their run (:func:`~mnist_dist.runs.check_output`), and named with a
    suffix of the format. It is written to a temporary file, then renamed.
    """
    from .recognize import Recognizer

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    default = default_output(weights, fmt)
    target = check_output(default if output is None else output, (weights_file(weights),), example=default.name)
    check_suffix(target, fmt)
    model = Recognizer.load(weights).model
    target.parent.mkdir(parents=True, exist_ok=True)
    (export_torchscript if fmt == "torchscript" else export_onnx)(model, target)
    return target


def run_exported(path: str | os.PathLike, images: torch.Tensor) -> torch.Tensor:
    """Logits from an exported file for ``images (N, 28, 28)``, run by its own runtime.

    TorchScript runs with ``torch.jit.load``; ONNX with onnxruntime, or else the
    reference evaluator that ships with the ``onnx`` package.
    """
    p = Path(path)
    x = images.float().contiguous()
    if p.suffix != ".onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(p))
        with torch.no_grad():
            return module(x)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"images": x.numpy()})
    else:
        from onnx.reference import ReferenceEvaluator

        (logits,) = ReferenceEvaluator(str(p)).run(None, {"images": x.numpy()})
    return torch.from_numpy(logits)


def max_logit_difference(path: str | os.PathLike, model: MLP, images: torch.Tensor) -> float:
    """Largest absolute difference between the exported file's logits and ``model``'s on ``images``."""
    with torch.no_grad():
        expected = model.eval()(images.float())
    return float((run_exported(path, images) - expected).abs().max())


def verify_export(path: str | os.PathLike, weights: str | os.PathLike, count: int = 256) -> float:
    """Check the exported file against the PyTorch model on ``count`` random images; return the gap.

    Raises :class:`ExportError` if any logit differs by more than ``TOLERANCE``.
    """
    from .recognize import Recognizer

    images = torch.rand(count, 28, 28, generator=torch.Generator().manual_seed(1))
    gap = max_logit_difference(path, Recognizer.load(weights).model, images)
    if gap > TOLERANCE:
        raise ExportError(f"{path} gives logits up to {gap:.3g} away from the PyTorch model's (allowed {TOLERANCE})")
    return gap
