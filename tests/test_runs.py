import os

import pytest
import torch

from mnist_dist.errors import RunDirError
from mnist_dist.runs import atomic_write_bytes, load_weights, prepare_run_dir, save_weights


def test_weights_round_trip_as_safetensors(tmp_path):
    state = {"layers.0.weight": torch.randn(4, 3), "layers.0.bias": torch.randn(4)}
    save_weights(state, tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors")
    assert all(torch.equal(state[k], loaded[k]) for k in state)


def test_pickle_file_is_not_loaded_as_weights(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.safetensors"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="is not a safetensors weights file"):
        load_weights(path)
    assert not marker.exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(RunDirError, match="No space left on device.*previous copy is kept"):
        atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_unwritable_run_dir_is_reported(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="not writable"):
        prepare_run_dir(tmp_path / "f" / "run")
    assert prepare_run_dir(tmp_path / "new" / "run").is_dir()


def _run_with_weights(run_dir):
    """A run directory as training leaves it: weights and the checksum metrics.json records for them."""
    import json

    run_dir.mkdir()
    state = {"layers.0.weight": torch.randn(4, 3), "layers.0.bias": torch.randn(4)}
    digest = save_weights(state, run_dir / "model.safetensors")
    (run_dir / "metrics.json").write_text(json.dumps({"test_accuracy": 0.9, "weights_sha256": digest}))
    return state


def test_a_run_directory_names_its_weights_and_they_are_verified(tmp_path):
    from mnist_dist.runs import sha256_file

    state = _run_with_weights(tmp_path / "run")
    assert (
        sha256_file(tmp_path / "run/model.safetensors")
        == __import__("json").loads((tmp_path / "run/metrics.json").read_text())["weights_sha256"]
    )  # the checksum is of the bytes written
    for path in (tmp_path / "run", tmp_path / "run/model.safetensors"):
        loaded = load_weights(path)
        assert all(torch.equal(state[k], loaded[k]) for k in state)


def test_a_changed_byte_in_a_runs_weights_is_refused_but_a_bare_copy_loads(tmp_path):
    import shutil

    from mnist_dist.errors import WeightsChangedError

    _run_with_weights(tmp_path / "run")
    weights = tmp_path / "run/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # inside the last float: still a valid safetensors file
    weights.write_bytes(bytes(data))
    for path in (tmp_path / "run", weights):
        with pytest.raises(
            WeightsChangedError,
            match=r"model.safetensors does not match the SHA-256 its run "
            r"recorded in .*metrics.json .*changed after training",
        ):
            load_weights(path)
    shutil.copy(weights, tmp_path / "copy.safetensors")  # a bare file: loaded as it is
    assert set(load_weights(tmp_path / "copy.safetensors")) == {"layers.0.weight", "layers.0.bias"}


def test_a_run_directory_without_weights_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_weights(tmp_path)


def test_the_writability_probe_never_touches_another_nodes_probe(tmp_path):
    """Nodes sharing a run directory often run processes with the same pid: the probes must differ."""
    import os

    from mnist_dist.runs import prepare_run_dir

    others = tmp_path / f".write-test-{os.getpid()}"  # what another node's probe, same pid, was called
    others.write_bytes(b"theirs")
    prepare_run_dir(tmp_path)
    assert others.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == [others.name]
