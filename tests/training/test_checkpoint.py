"""Writing checkpoints: atomic saves, retention, same-step replacement, and when to save."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from mnist_dist.config import Config
from mnist_dist.errors import CheckpointError
from mnist_dist.runs import checkpoints_dir
from mnist_dist.training import checkpoint
from mnist_dist.training.checkpoint import CheckpointManager
from mnist_dist.training.integrity import verify_checkpoint
from mnist_dist.training.resume import complete_checkpoints, resolve

from conftest import REPO
from saving import flip_byte


def test_retention_keeps_the_newest_and_never_counts_or_deletes_a_damaged_one(saver, tmp_path):
    for step in (1, 2, 3):
        saver(tmp_path, step, keep=2)
    root = checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    flip_byte(root / "step-00000003/optimizer.bin")
    saver(tmp_path, 4, keep=2)
    saver(tmp_path, 5, keep=2)
    # The damaged step 3 stays for inspection; the two newest good ones are kept.
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004", "step-00000005"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_retention_never_deletes_the_checkpoint_just_written(saver, tmp_path):
    for step in (50, 60):  # newer checkpoints lying around, e.g. copied in from another run
        saver(tmp_path, step)
    just_written = saver(tmp_path, 10, keep=1)
    assert complete_checkpoints(tmp_path) == [just_written]


def test_a_damaged_checkpoint_of_the_same_step_is_set_aside_not_deleted(saver, tmp_path):
    path = saver(tmp_path, 10)
    flip_byte(path / "model.safetensors")
    saver(tmp_path, 10)
    names = sorted(p.name for p in checkpoints_dir(tmp_path).iterdir())
    assert names[0] == "step-00000010" and names[1].startswith("step-00000010.damaged-") and len(names) == 2
    assert verify_checkpoint(path).ok


WATCHER = textwrap.dedent("""
    import sys, time
    from mnist_dist.training import resume
    run_dir, seconds = sys.argv[1], float(sys.argv[2])
    looks = gaps = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        looks += 1
        if not resume.complete_checkpoints(run_dir, warn=False):
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
    left = {p.name for p in checkpoints_dir(tmp_path).iterdir()}
    # Without the exchange, the previous copy waits beside it until the next save.
    assert left == ({"step-00000007"} if swap == "exchange" else {"step-00000007", ".replaced-step-00000007"})


SAVER = textwrap.dedent("""
    import os, sys, torch
    from accelerate import Accelerator
    from mnist_dist.training import checkpoint
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
            if path.name == "trainer_state.json":
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
    root = checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-00000020", "step-00000010"]
    cfg = Config(output_dir=str(tmp_path))
    assert resolve(cfg, tmp_path) == root / "step-00000010"  # the previous one
    with pytest.raises(CheckpointError, match="cannot be used: it has no trainer_state.json"):
        resolve(Config(resume=str(root / ".tmp-step-00000020")), tmp_path / "other")


def test_one_policy_decides_when_to_save():
    every_100 = CheckpointManager(None, None, every_steps=100, every_epochs=0, keep=2)
    assert every_100.due_after_step(200, epoch_done=False, finished=False)
    assert not every_100.due_after_step(250, epoch_done=False, finished=False)
    # The epoch's (or the run's) end comes with this step: that save is made then, not twice.
    assert not every_100.due_after_step(200, epoch_done=True, finished=False)
    assert not every_100.due_after_step(200, epoch_done=False, finished=True)
    assert every_100.due_after_epoch(300, epoch=1, finished=False)
    assert not every_100.due_after_epoch(938, epoch=1, finished=False)
    assert every_100.due_after_epoch(938, epoch=1, finished=True)  # the end of training always saves
    each_epoch = CheckpointManager(None, None, every_steps=0, every_epochs=1, keep=2)
    assert not each_epoch.due_after_step(100, epoch_done=False, finished=False)
    assert each_epoch.due_after_epoch(938, epoch=1, finished=False)
    every_3rd = CheckpointManager(None, None, every_steps=0, every_epochs=3, keep=2)
    assert [e for e in range(1, 10) if every_3rd.due_after_epoch(938 * e, epoch=e, finished=False)] == [3, 6, 9]


def test_every_file_of_a_checkpoint_has_the_usual_permissions(saver, tmp_path):
    """Others in a shared project directory can read a checkpoint as they read the rest of the run."""
    from mnist_dist.runs import file_mode

    path = saver(tmp_path, 5)
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert set(modes.values()) == {file_mode()}, modes  # Accelerate writes model.safetensors 0600
