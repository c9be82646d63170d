"""Checkpoints verified by their content: every kind of file, a changed byte caught and named."""

from __future__ import annotations

import json
import logging

import pytest

from mnist_dist.config import Config
from mnist_dist.errors import CheckpointError
from mnist_dist.runs import STATE_FILE, sha256_file
from mnist_dist.training.integrity import read_state, state_digest, verify_checkpoint
from mnist_dist.training.resume import complete_checkpoints, resolve, verify_run

from saving import FILE_KINDS, flip_byte


def test_a_saved_checkpoint_records_a_checksum_of_every_file(saver, tmp_path):
    path = saver(tmp_path, 10)
    state = read_state(path)
    assert state["format"] == 2 and sorted(state["files"]) == sorted(f for f in FILE_KINDS if f != STATE_FILE)
    for name, entry in state["files"].items():
        assert entry == {"size": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
    assert state["sha256"] == state_digest(state)
    assert verify_checkpoint(path).describe() == "good (SHA-256 verified)"


@pytest.mark.parametrize("name", FILE_KINDS)
def test_a_flipped_byte_in_any_file_is_caught_and_named(saver, tmp_path, caplog, name):
    older, newest = saver(tmp_path, 10), saver(tmp_path, 20)
    flip_byte(newest / name)
    verdict = verify_checkpoint(newest)
    assert not verdict.ok and name in verdict.problem, verdict
    print(f"{name}: {verdict.problem}")
    # --resume auto: one warning naming the file, and the previous checkpoint is used.
    with caplog.at_level(logging.WARNING, logger="mnist_dist"):
        assert resolve(Config(output_dir=str(tmp_path)), tmp_path) == older
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and str(newest) in warnings[0], warnings
    # --resume PATH of the damaged checkpoint: an error naming the file.
    with pytest.raises(CheckpointError, match=rf"{newest}: this checkpoint cannot be used: .*{name}"):
        resolve(Config(resume=str(newest), output_dir=str(tmp_path / "elsewhere")), tmp_path / "elsewhere")
    lines, ok = verify_run(tmp_path)
    assert not ok and lines[0].endswith("good (SHA-256 verified)") and name in lines[1]


def test_a_changed_number_in_the_trainer_state_is_caught(saver, tmp_path):
    path = saver(tmp_path, 1234)
    state_file = path / STATE_FILE
    text = state_file.read_text()
    state_file.write_text(text.replace('"step": 1234', '"step": 1235'))  # still valid JSON
    assert "trainer_state.json does not match its checksum" in verify_checkpoint(path).problem


def test_a_checkpoint_cut_short_is_skipped(saver, tmp_path, caplog):
    older, newest = saver(tmp_path, 10), saver(tmp_path, 20)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, e.g. by a full disk
    assert complete_checkpoints(tmp_path) == [older]
    assert "model.safetensors has 1000 bytes" in caplog.text


def test_checkpoints_from_before_checksums_still_load_with_a_note(saver, tmp_path, caplog):
    path = saver(tmp_path, 10)
    state = read_state(path)
    state.pop("sha256")
    old = {**state, "format": 1, "files": {n: e["size"] for n, e in state["files"].items()}}
    (path / STATE_FILE).write_text(json.dumps(old))  # what the previous version wrote
    verdict = verify_checkpoint(path)
    assert verdict.ok and verdict.size_only and "checked by size only" in verdict.describe()
    with caplog.at_level(logging.INFO, logger="mnist_dist"):
        assert resolve(Config(output_dir=str(tmp_path)), tmp_path) == path
    assert "written before checksums; it could only be checked by size" in caplog.text
