import os

import pytest
import torch

from mnist_dist.runs import RunDirError, atomic_write_bytes, load_weights, prepare_run_dir, save_weights


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


def test_the_writability_probe_never_touches_another_nodes_probe(tmp_path):
    """Nodes sharing a run directory often run processes with the same pid: the probes must differ."""
    import os

    from mnist_dist.runs import prepare_run_dir

    others = tmp_path / f".write-test-{os.getpid()}"  # what another node's probe, same pid, was called
    others.write_bytes(b"theirs")
    prepare_run_dir(tmp_path)
    assert others.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == [others.name]
