"""``mnist-dist predict``, ``export`` and ``serve`` as a user runs them: output, exit status, one-line errors."""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest
from click.testing import CliRunner
from inference.fuzzing import broken_files, files_pillow_warns_about
from PIL import Image

from mnist_dist.cli import main

from conftest import REPO, run_cli


@pytest.fixture()
def mixed_dir(tmp_path, mnist_test):
    """Two MNIST test digits as PNG (one in a subfolder), a text file named .png, an empty file, a blank image."""
    images, _ = mnist_test
    Image.fromarray(images[0].numpy()).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(images[1].numpy()).save(tmp_path / "sub" / "b.png")
    (tmp_path / "notes.png").write_text("not a picture\n")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("L", (80, 60), 0).save(tmp_path / "blank.png")
    return tmp_path


def test_predict_json_gives_one_object_per_good_file_and_error_lines(trained_weights, mixed_dir, mnist_test):
    result = CliRunner().invoke(main, ["predict", "--weights", str(trained_weights), "--json", str(mixed_dir)])
    assert result.exit_code == 1
    objects = {o["file"]: o for o in map(json.loads, result.stdout.splitlines())}
    assert sorted(objects) == [str(mixed_dir / "a.png"), str(mixed_dir / "sub" / "b.png")]
    for o in objects.values():
        assert set(o) == {"file", "digit", "confidence", "probabilities"}
        assert o["confidence"] == max(o["probabilities"])
    assert objects[str(mixed_dir / "a.png")]["digit"] == int(mnist_test[1][0])  # a 7, read right
    errors = result.stderr.splitlines()
    assert f"{mixed_dir / 'notes.png'}: not an image Pillow can read (cannot identify image file)" in errors
    assert f"{mixed_dir / 'empty.png'}: file is empty" in errors
    assert f"{mixed_dir / 'blank.png'}: no ink found (blank image)" in errors
    assert errors[-1] == "3 of 5 files could not be recognised"


def test_predict_table_with_top_k_and_success_exit(trained_run_dir, mixed_dir):
    paths = [str(mixed_dir / "a.png"), str(mixed_dir / "sub" / "b.png")]
    result = CliRunner().invoke(main, ["predict", "--weights", str(trained_run_dir), "--top-k", "3", *paths])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["file", "digit", "confidence", "top", "3"]
    assert len(lines) == 3 and all(line.count("%") == 4 for line in lines[1:])


def test_predict_json_top_k(trained_weights, mixed_dir):
    args = ["predict", "--weights", str(trained_weights), "--json", "--top-k", "2", str(mixed_dir / "a.png")]
    obj = json.loads(CliRunner().invoke(main, args).stdout)
    assert obj["top_k"][0]["digit"] == obj["digit"] and len(obj["top_k"]) == 2


def test_predict_gives_one_line_per_broken_file_in_a_real_process(trained_weights, tmp_path):
    """The real command on a dozen truncated, bit-flipped and random files, and two Pillow warns about:
    one ``FILE: reason`` line for each it cannot read, a count, exit status 1; no traceback, no
    warning, and done in bounded time."""
    paths = []
    for name, data in broken_files(12) + files_pillow_warns_about():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    started = time.monotonic()
    proc = run_cli(["mnist_dist.cli", "predict", "--weights", str(trained_weights), "--json", *paths], timeout=120)
    assert time.monotonic() - started < 60 and "Traceback" not in proc.stderr, proc.stderr
    *failed, count = proc.stderr.splitlines()
    predicted = [json.loads(line)["file"] for line in proc.stdout.splitlines()]
    assert count == f"{len(failed)} of 14 files could not be recognised" and proc.returncode == 1
    assert sorted(predicted + [line.split(": ", 1)[0] for line in failed]) == sorted(paths)
    assert len(failed) >= 8, proc.stderr


@pytest.mark.parametrize("command", [["predict"], ["export", "--format", "torchscript"]])
def test_missing_weights_are_one_clear_line(tmp_path, command):
    args = [command[0], "--weights", str(tmp_path / "no.safetensors"), *command[1:]]
    if command[0] == "predict":
        args.append(str(tmp_path))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("Error: weights file") and "does not exist" in result.output


def test_export_command_writes_and_checks_the_file(trained_weights, tmp_path):
    out = tmp_path / "deploy" / "digits.pt"
    args = ["export", "--weights", str(trained_weights), "--format", "torchscript", "--output", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and f"wrote {out} (torchscript)" in result.output
    assert "largest logit difference from PyTorch" in result.output


# Were the server to start, it would run on: these run in a process with a time limit.
SERVE_WITHOUT_FASTAPI = (
    "import sys; sys.modules['fastapi'] = None; from mnist_dist.cli import entry_point; entry_point()"
)


def test_serve_errors_are_one_line(trained_run_dir, tmp_path):
    proc = run_cli(["mnist_dist.cli", "serve", "--weights", str(tmp_path / "none.safetensors")], timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(["mnist_dist.cli", "serve", "--weights", str(trained_run_dir), "--port", str(port)], timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: cannot listen on 127.0.0.1:")
    assert "choose another --port" in proc.stderr and proc.stderr.count("Error") == 1
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_FASTAPI, "serve", "--weights", str(trained_run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "mnist-dist serve needs the package 'fastapi'" in proc.stderr and "mnist-dist[serve]" in proc.stderr


def test_help_lists_the_commands_without_loading_what_they_run():
    import subprocess

    code = (
        "import sys; from mnist_dist.cli import main; print(sorted(main.commands)); "
        "print([m for m in ('fastapi', 'uvicorn', 'starlette', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    commands, imported = out.splitlines()
    assert all(f"'{c}'" in commands for c in ("predict", "export", "serve")) and imported == "[]"
