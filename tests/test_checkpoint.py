"""The checkpoint files themselves: atomic saves, content checksums, retention, replacement, old formats."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from mnist_dist import checkpoint
from mnist_dist.config import Config
from mnist_dist.model import MLP

# Every kind of file a one-process checkpoint holds.
FILE_KINDS = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "rank-0.json", "trainer_state.json"]


def position(step: int) -> dict:
    return {
        "progress": {"step": step, "epoch": 0, "batch": step, "train_seconds": 1.0},
        "world_size": 1,
        "config": Config().to_dict(),
        "scheduler": None,
        "wandb_run_id": None,
    }


RANK = {"interval_loss": 0.25, "interval_steps": 3, "epoch_loss": 1.5, "epoch_steps": 10}


@pytest.fixture
def saver():
    """``save(run_dir, step, keep)`` writes a real checkpoint of an MLP with momentum buffers."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = MLP(hidden_sizes=(16,))
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

    def save(run_dir: Path, step: int, keep: int = 10) -> Path:
        optimizer.zero_grad()
        model(torch.rand(4, 28, 28)).sum().backward()
        optimizer.step()
        return checkpoint.save(accelerator, run_dir, position(step), RANK, keep)

    return save


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_saved_checkpoint_records_a_checksum_of_every_file(saver, tmp_path):
    path = saver(tmp_path, 10)
    state = checkpoint.read_state(path)
    assert state["format"] == 2 and sorted(state["files"]) == sorted(
        f for f in FILE_KINDS if f != checkpoint.STATE_FILE
    )
    for name, entry in state["files"].items():
        assert entry == {"size": (path / name).stat().st_size, "sha256": checkpoint.sha256_file(path / name)}
    assert state["sha256"] == checkpoint.state_digest(state)
    assert checkpoint.inspect(path).describe() == "good (SHA-256 verified)"


@pytest.mark.parametrize("name", FILE_KINDS)
def test_a_flipped_byte_in_any_file_is_caught_and_named(saver, tmp_path, caplog, name):
    older, newest = saver(tmp_path, 10), saver(tmp_path, 20)
    flip_byte(newest / name)
    verdict = checkpoint.inspect(newest)
    assert not verdict.ok and name in verdict.problem, verdict
    print(f"{name}: {verdict.problem}")
    # --resume auto: one warning naming the file, and the previous checkpoint is used.
    with caplog.at_level(logging.WARNING, logger="mnist_dist"):
        assert checkpoint.resolve(Config(output_dir=str(tmp_path)), tmp_path) == older
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and str(newest) in warnings[0], warnings
    # --resume PATH of the damaged checkpoint: an error naming the file.
    with pytest.raises(checkpoint.CheckpointError, match=rf"{newest}: this checkpoint cannot be used: .*{name}"):
        checkpoint.resolve(Config(resume=str(newest), output_dir=str(tmp_path / "elsewhere")), tmp_path / "elsewhere")
    lines, ok = checkpoint.verify_run(tmp_path)
    assert not ok and lines[0].endswith("good (SHA-256 verified)") and name in lines[1]


def test_a_changed_number_in_the_trainer_state_is_caught(saver, tmp_path):
    path = saver(tmp_path, 1234)
    state_file = path / checkpoint.STATE_FILE
    text = state_file.read_text()
    state_file.write_text(text.replace('"step": 1234', '"step": 1235'))  # still valid JSON
    assert "trainer_state.json does not match its checksum" in checkpoint.inspect(path).problem


def test_a_checkpoint_cut_short_is_skipped(saver, tmp_path, caplog):
    older, newest = saver(tmp_path, 10), saver(tmp_path, 20)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, e.g. by a full disk
    assert checkpoint.complete_checkpoints(tmp_path) == [older]
    assert "model.safetensors has 1000 bytes" in caplog.text


def test_retention_keeps_the_newest_and_never_counts_or_deletes_a_damaged_one(saver, tmp_path):
    for step in (1, 2, 3):
        saver(tmp_path, step, keep=2)
    root = checkpoint.checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    flip_byte(root / "step-00000003/optimizer.bin")
    saver(tmp_path, 4, keep=2)
    saver(tmp_path, 5, keep=2)
    # The damaged step 3 stays for inspection; the two newest good ones are kept.
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004", "step-00000005"]
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_retention_never_deletes_the_checkpoint_just_written(saver, tmp_path):
    for step in (50, 60):  # newer checkpoints lying around, e.g. copied in from another run
        saver(tmp_path, step)
    just_written = saver(tmp_path, 10, keep=1)
    assert checkpoint.complete_checkpoints(tmp_path) == [just_written]


def test_a_damaged_checkpoint_of_the_same_step_is_set_aside_not_deleted(saver, tmp_path):
    path = saver(tmp_path, 10)
    flip_byte(path / "model.safetensors")
    saver(tmp_path, 10)
    names = sorted(p.name for p in checkpoint.checkpoints_dir(tmp_path).iterdir())
    assert names[0] == "step-00000010" and names[1].startswith("step-00000010.damaged-") and len(names) == 2
    assert checkpoint.inspect(path).ok


WATCHER = textwrap.dedent("""
    import sys, time
    from mnist_dist import checkpoint
    run_dir, seconds = sys.argv[1], float(sys.argv[2])
    looks = gaps = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        looks += 1
        if not checkpoint.complete_checkpoints(run_dir, warn=False):
            gaps += 1
    print(looks, gaps)
""")


@pytest.mark.parametrize("swap", ["exchange", "fallback"])
def test_replacing_a_checkpoint_of_the_same_step_never_leaves_none(saver, tmp_path, monkeypatch, swap):
    """keep_checkpoints 1, the same step saved again and again while another process keeps looking."""
    if swap == "fallback":  # as on a filesystem without renameat2's exchange (e.g. NFS)
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    saver(tmp_path, 7, keep=1)
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, str(tmp_path), "4"], cwd=REPO, text=True, stdout=subprocess.PIPE
    )
    end = time.monotonic() + 4
    saves = 0
    while time.monotonic() < end:
        saver(tmp_path, 7, keep=1)
        saves += 1
    looks, gaps = map(int, watcher.communicate(timeout=60)[0].split())
    print(f"{swap}: {saves} replacements, {looks} looks, {gaps} without a checkpoint")
    assert saves > 10 and looks > 100 and gaps == 0
    left = {p.name for p in checkpoint.checkpoints_dir(tmp_path).iterdir()}
    # Without the exchange, the previous copy waits beside it until the next save.
    assert left == ({"step-00000007"} if swap == "exchange" else {"step-00000007", ".replaced-step-00000007"})


def test_checkpoints_from_before_checksums_still_load_with_a_note(saver, tmp_path, caplog):
    path = saver(tmp_path, 10)
    state = checkpoint.read_state(path)
    state.pop("sha256")
    old = {**state, "format": 1, "files": {n: e["size"] for n, e in state["files"].items()}}
    (path / checkpoint.STATE_FILE).write_text(json.dumps(old))  # what the previous version wrote
    verdict = checkpoint.inspect(path)
    assert verdict.ok and verdict.size_only and "checked by size only" in verdict.describe()
    with caplog.at_level(logging.INFO, logger="mnist_dist"):
        assert checkpoint.resolve(Config(output_dir=str(tmp_path)), tmp_path) == path
    assert "written before checksums; it could only be checked by size" in caplog.text


SAVER = textwrap.dedent("""
    import os, sys, torch
    from accelerate import Accelerator
    from mnist_dist import checkpoint
    from mnist_dist.model import MLP

    run_dir, crash = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(MLP(), torch.optim.SGD(MLP().parameters(), lr=0.1, momentum=0.9))
    def state(step):
        return {"progress": {"step": step, "epoch": 0, "batch": step, "train_seconds": 1.0}, "world_size": 1,
                "config": {}, "scheduler": None, "wandb_run_id": None}
    rank = {"interval_loss": 0.0, "interval_steps": 0, "epoch_loss": 0.0, "epoch_steps": 0}
    checkpoint.save(accelerator, run_dir, state(10), rank, keep=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    # Die half-way through the second save, as a kill -9 would leave it.
    if crash == "in-accelerate":
        import accelerate.checkpointing as ac
        real = ac.save
        def save_then_die(obj, f, *a, **k):
            real(obj, f, *a, **k)
            os._exit(9)  # after the model file, before optimizer and RNG states
        ac.save = save_then_die
    elif crash == "before-commit":
        real_json = checkpoint._write_json
        def die_on_state(path, obj):
            if path.name == checkpoint.STATE_FILE:
                os._exit(9)  # every file written, trainer_state.json not yet
            real_json(path, obj)
        checkpoint._write_json = die_on_state
    checkpoint.save(accelerator, run_dir, state(20), rank, keep=2)
""")


@pytest.mark.parametrize("crash", ["in-accelerate", "before-commit"])
def test_a_save_killed_half_way_is_never_loaded(tmp_path, crash):
    proc = subprocess.run(
        [sys.executable, "-c", SAVER, str(tmp_path), crash], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 9, proc.stderr[-2000:]
    root = checkpoint.checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-00000020", "step-00000010"]
    cfg = Config(output_dir=str(tmp_path))
    assert checkpoint.resolve(cfg, tmp_path) == root / "step-00000010"  # the previous one
    with pytest.raises(checkpoint.CheckpointError, match="cannot be used: it has no trainer_state.json"):
        checkpoint.resolve(Config(resume=str(root / ".tmp-step-00000020")), tmp_path / "other")


def test_resume_path_never_goes_behind_the_run_directory(saver, tmp_path, caplog):
    source, own = tmp_path / "source", tmp_path / "own"
    requested = saver(source, 100)
    assert checkpoint.resolve(Config(resume=str(requested)), own) == requested  # nothing of its own yet
    newer = saver(own, 250)
    with caplog.at_level(logging.INFO, logger="mnist_dist"):
        assert checkpoint.resolve(Config(resume=str(requested)), own) == newer
        assert checkpoint.resolve(Config(resume=str(source)), own) == newer  # a run directory as PATH
    assert "holds a newer checkpoint (step 250) than --resume" in caplog.text
    assert checkpoint.resolve(Config(resume=str(saver(source, 300))), own).name == "step-00000300"


def test_compatibility_rules(tmp_path):
    saved = {"world_size": 2, "config": Config().to_dict(), "progress": {"epoch": 3, "step": 2814}}
    assert (
        checkpoint.check_compatible(saved, Config(output_dir="elsewhere", log_every=5, epochs=20), 2, tmp_path) is None
    )
    # Another number of processes: the same global batches in batch_mode global.
    note = checkpoint.check_compatible(saved, Config(), 1, tmp_path / "step-00002814")
    assert note == "checkpoint step-00002814 was written by 2 process(es), continuing on 1"
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot continue on 3 processes: .*'batch_size' \(64\)"):
        checkpoint.check_compatible(saved, Config(), 3, tmp_path)
    per_device = {**saved, "config": Config(batch_mode="per_device").to_dict()}
    with pytest.raises(checkpoint.CheckpointError, match=r"per_device.*global batch would change \(128 -> 256\)"):
        checkpoint.check_compatible(per_device, Config(batch_mode="per_device"), 4, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="momentum 0.0 -> 0.9"):
        checkpoint.check_compatible(saved, Config(momentum=0.9), 2, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="beyond this run"):
        checkpoint.check_compatible(saved, Config(epochs=2), 2, tmp_path)
    cosine = {**saved, "config": Config(lr_schedule="cosine").to_dict()}
    with pytest.raises(checkpoint.CheckpointError, match="epochs 10 -> 20"):  # the schedule depends on the length
        checkpoint.check_compatible(cosine, Config(lr_schedule="cosine", epochs=20), 2, tmp_path)


def test_rank_state_of_another_world_size_keeps_the_mean(tmp_path):
    for rank, loss in enumerate((1.0, 2.0, 6.0)):
        (tmp_path / f"rank-{rank}.json").write_text(
            json.dumps({"interval_loss": loss, "interval_steps": 4, "epoch_loss": 10 * loss, "epoch_steps": 9})
        )
    mean = checkpoint._mean_rank_state(tmp_path, 3)
    assert mean == {"interval_loss": 3.0, "interval_steps": 4, "epoch_loss": 30.0, "epoch_steps": 9}
