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

from conftest import RUN_TARGETS, assert_one_error_line, digests, skip_or_fail

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


# --- the output never overwrites the run's files or the weights read ------------------------


@pytest.mark.parametrize("target", [*RUN_TARGETS, "loose weights"])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_refuses_a_runs_files_and_its_input(run_copy, tmp_path, target, fmt):
    loose = tmp_path / "loose.safetensors"
    loose.write_bytes((run_copy / "model.safetensors").read_bytes())
    weights, output = (loose, loose) if target == "loose weights" else (run_copy, run_copy / target)
    before = digests(tmp_path)
    result = CliRunner().invoke(main, ["export", "--weights", str(weights), "--format", fmt, "--output", str(output)])
    assert result.exit_code == 1
    line = assert_one_error_line(result.output)
    assert f"--output {output} is " in line and "write it elsewhere, e.g. --output " in line
    assert digests(tmp_path) == before


def test_a_suffix_of_another_format_is_refused_before_anything_is_written(run_copy, tmp_path):
    before, run_before = digests(tmp_path), digests(run_copy)
    for fmt, output, hint in [
        ("torchscript", "digits.onnx", "or use --format onnx"),
        ("onnx", "digits.pt", "or use --format torchscript"),
        ("torchscript", "digits.json", ""),
        ("onnx", "digits", ""),
    ]:
        args = ["export", "--weights", str(run_copy), "--format", fmt, "--output", str(tmp_path / output)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1
        line = assert_one_error_line(result.output)
        assert f"{fmt} files end in" in line and line.endswith(hint) and "name it e.g. --output " in line
        assert (f"ends in '{Path(output).suffix}'" if Path(output).suffix else "has no suffix") in line
    assert digests(tmp_path) == before
    assert export_model(run_copy, "torchscript", tmp_path / "digits.ts") == tmp_path / "digits.ts"  # a suffix it has
    assert digests(run_copy) == run_before


def test_the_export_command_refuses_a_runs_weights_end_to_end(run_copy):
    """The real command line, in its own process: one line, exit status 1, the run untouched."""
    from conftest import run_cli

    before = digests(run_copy)
    output = run_copy / "model.safetensors"
    args = ["mnist_dist.cli", "export", "--weights", str(run_copy), "--format", "torchscript", "--output", str(output)]
    proc = run_cli(args, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert assert_one_error_line(proc.stderr) == (
        f"Error: --output {output} is the run's own weights file ({run_copy} is a run directory); "
        f"write it elsewhere, e.g. --output {run_copy}/model.pt"
    )
    assert digests(run_copy) == before


def test_a_failed_onnx_export_leaves_no_partial_file(weights, tmp_path, monkeypatch):
    if missing_onnx_packages():  # the exporter runs only when its packages are there
        skip_or_fail(f"ONNX export needs {' and '.join(missing_onnx_packages())} (pip install onnx onnxscript)")
    out = tmp_path / "out"
    out.mkdir()

    def half_written(model, args, path, **kwargs):
        Path(path).write_bytes(b"half an onnx file")
        raise RuntimeError("the exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    with pytest.raises(ExportError, match="ONNX export failed"):
        export_model(weights, "onnx", out / "model.onnx")
    assert list(out.iterdir()) == []


def test_a_failed_write_leaves_no_temporary_file(weights, tmp_path, monkeypatch):
    from mnist_dist.errors import RunDirError

    out = tmp_path / "out"
    out.mkdir()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(RunDirError, match="No space left on device"):
        export_model(weights, "torchscript", out / "model.pt")
    assert list(out.iterdir()) == []
