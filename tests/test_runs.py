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


# --- check_output: nothing a command writes overwrites a run's file or its own input ----------


def _full_run(run_dir):
    """A run directory with every kind of file a run owns, and a checkpoint."""
    _run_with_weights(run_dir)
    for name in ("config.yaml", "history.jsonl", "misclassified.safetensors", "doctor.json"):
        (run_dir / name).write_text("x\n")
    (run_dir / "checkpoints/step-00000001").mkdir(parents=True)
    (run_dir / "checkpoints/step-00000001/trainer_state.json").write_text("{}\n")
    return run_dir


@pytest.mark.parametrize(
    "name, role",
    [
        ("model.safetensors", "the run's own weights file"),
        ("metrics.json", "the run's metrics and weights checksum"),
        ("config.yaml", "the run's config"),
        ("history.jsonl", "the run's history"),
        ("misclassified.safetensors", "the run's misclassified digits"),
        ("doctor.json", "the run's preflight report"),
        ("checkpoints/step-00000001/model.safetensors", "inside the run's checkpoints/ directory"),
        ("checkpoints/step-00000001/trainer_state.json", "inside the run's checkpoints/ directory"),
    ],
)
def test_check_output_refuses_every_file_a_run_owns(tmp_path, name, role):
    from mnist_dist.errors import OutputPathError, UserError
    from mnist_dist.runs import check_output

    run = _full_run(tmp_path / "exp")
    with pytest.raises(OutputPathError) as info:
        check_output(run / name, example="model.pt")
    message = str(info.value)
    assert message == (
        f"--output {run / name} is {role} ({run} is a run directory); write it elsewhere, e.g. --output {run}/model.pt"
    )
    assert "\n" not in message and isinstance(info.value, (UserError, ValueError))


def test_check_output_refuses_the_input_by_any_name(tmp_path):
    """The same path, the same path spelt another way, a symlink, a hard link: all one file."""
    from mnist_dist.errors import OutputPathError
    from mnist_dist.runs import check_output

    weights = tmp_path / "loose.safetensors"
    weights.write_bytes(b"weights")
    (tmp_path / "link.pt").symlink_to(weights)
    os.link(weights, tmp_path / "hard.pt")
    (tmp_path / "sub").mkdir()
    for output in (weights, tmp_path / "sub/../loose.safetensors", tmp_path / "link.pt", tmp_path / "hard.pt"):
        with pytest.raises(OutputPathError, match=rf"is the file this command reads \({weights}\); write it"):
            check_output(output, (weights,), example="model.pt")
    assert weights.read_bytes() == b"weights"


def test_check_output_refuses_a_directory_and_allows_new_files_anywhere_else(tmp_path):
    from mnist_dist.errors import OutputPathError
    from mnist_dist.runs import check_output

    run = _full_run(tmp_path / "exp")
    with pytest.raises(OutputPathError, match=rf"--output {run} is a directory; name a file in it, e.g. "):
        check_output(run, example="eval.json")
    (tmp_path / "loose").mkdir()  # a folder with weights alone is no run directory
    (tmp_path / "loose/model.safetensors").write_bytes(b"w")
    for allowed in (run / "eval.json", run / "model.pt", tmp_path / "loose/model.safetensors", tmp_path / "new/x.json"):
        assert check_output(str(allowed), (run / "model.safetensors",)) == allowed


def test_an_edited_checksum_is_not_blamed_on_the_weights(tmp_path):
    """metrics.json changed, the weights did not: the message says the two disagree, either may have changed."""
    import json

    from mnist_dist.errors import WeightsChangedError

    _run_with_weights(tmp_path / "run")
    metrics = tmp_path / "run/metrics.json"
    body = json.loads(metrics.read_text())
    body["weights_sha256"] = "0" * 64
    metrics.write_text(json.dumps(body))
    with pytest.raises(WeightsChangedError) as info:
        load_weights(tmp_path / "run")
    message = str(info.value)
    assert "the file changed after training" not in message
    assert f"{tmp_path / 'run/model.safetensors'} does not match the SHA-256 its run recorded in {metrics}" in message
    assert "000000000000... is recorded): the two disagree, so either the weights or the weights_sha256 of " in message
    assert message.endswith("metrics.json changed after training; retrain, or restore both files from a copy you trust")


def test_a_run_whose_checksum_was_removed_loads_with_one_warning(tmp_path, caplog):
    import json

    state = _run_with_weights(tmp_path / "run")
    metrics = tmp_path / "run/metrics.json"
    metrics.write_text(json.dumps({"test_accuracy": 0.9}))  # weights_sha256 deleted
    with caplog.at_level("WARNING", logger="mnist_dist"):
        loaded = load_weights(tmp_path / "run")
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    assert [r.getMessage() for r in caplog.records] == [
        f"{metrics} records no weights_sha256: {tmp_path / 'run/model.safetensors'} is loaded unchecked "
        "(written before checksums, or the key was removed)"
    ]
    caplog.clear()
    bare = tmp_path / "bare.safetensors"  # a weights file with no run around it: nothing to say
    bare.write_bytes((tmp_path / "run/model.safetensors").read_bytes())
    with caplog.at_level("WARNING", logger="mnist_dist"):
        load_weights(bare)
    assert caplog.records == []
