"""export: TorchScript (and ONNX where its packages are installed) give the PyTorch model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mnist_dist.cli import main
from mnist_dist.errors import ExportError
from mnist_dist.inference.export import (
    export_model,
    max_logit_difference,
    missing_onnx_packages,
    run_exported,
    verify_export,
)
from mnist_dist.inference.recognize import Recognizer
from mnist_dist.model import MLP
from mnist_dist.runs import save_weights

from conftest import skip_or_fail

# --- fixtures --------------------------------------------------------------------------------
# Logit equality needs no training: an untrained MLP with saved weights is enough, and fast.


@pytest.fixture()
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    save_weights(MLP(hidden_sizes=(64, 32)).state_dict(), path)
    return path


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 28, 28, generator=torch.Generator().manual_seed(n))


# --- TorchScript -----------------------------------------------------------------------------


def test_torchscript_gives_the_same_logits_for_any_batch_size(weights):
    path = export_model(weights, "torchscript")
    assert path == weights.with_suffix(".pt") and path.is_file()
    model = Recognizer.load(weights).model
    for n in (1, 7, 300):
        assert max_logit_difference(path, model, images(n)) < 1e-5
    assert run_exported(path, images(5)).shape == (5, 10)


def test_export_check_catches_a_file_from_other_weights(weights, tmp_path):
    save_weights(MLP(hidden_sizes=(64, 32)).state_dict(), tmp_path / "other.safetensors")
    other = export_model(tmp_path / "other.safetensors", "torchscript")
    with pytest.raises(ExportError, match="logits up to"):
        verify_export(other, weights)


def test_unknown_format_is_rejected(weights):
    with pytest.raises(ExportError, match="choose one of: torchscript, onnx"):
        export_model(weights, "tflite")


# --- ONNX: exported and checked where onnx + onnxscript are installed, else a clear message ---


@pytest.mark.skipif(not missing_onnx_packages(), reason="onnx and onnxscript are installed")
def test_onnx_without_its_packages_names_them(weights):
    missing = missing_onnx_packages()
    with pytest.raises(ExportError) as info:
        export_model(weights, "onnx")
    message = str(info.value)
    assert f"pip install {' '.join(missing)}" in message and "--format torchscript" in message
    assert not weights.with_suffix(".onnx").exists()
    result = CliRunner().invoke(main, ["export", "--weights", str(weights), "--format", "onnx"])
    assert result.exit_code == 1 and message in result.output


def test_onnx_gives_the_same_logits_for_any_batch_size(weights):
    if missing_onnx_packages():
        skip_or_fail(f"ONNX export needs {' and '.join(missing_onnx_packages())} (pip install onnx onnxscript)")
    path = export_model(weights, "onnx")
    assert path == weights.with_suffix(".onnx")
    model = Recognizer.load(weights).model
    for n in (1, 7, 300):
        assert max_logit_difference(path, model, images(n)) < 1e-4
