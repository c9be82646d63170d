"""What training refuses at start-up, checked by the doctor the same way: the batch split and the resume point."""

from __future__ import annotations

import dataclasses

from mnist_dist.config import Config
from mnist_dist.preflight.facts import FAIL, OK
from mnist_dist.preflight.startup import batch_split, resume_plan
from mnist_dist.runlock import RunLock


def test_the_batch_must_split_over_the_processes_as_training_requires():
    check = batch_split(Config(batch_size=64), 3)
    assert check.status == FAIL and check.detail == (
        "config key 'batch_size' (64) must be divisible by the number of processes (3) in batch_mode 'global'; "
        "use a multiple of 3 or batch_mode: per_device"
    )
    check = batch_split(Config(batch_size=64), 2)
    assert check == batch_split(Config(batch_size=64), 2)
    assert check.status == OK and check.detail == (
        "global batch 64 = 2 x 32 per process; 30000 training images and 938 steps per epoch on each"
    )
    check = batch_split(Config(batch_size=64, batch_mode="per_device", val_size=10000), 3)
    assert check.status == OK and check.detail.startswith("global batch 192 = 3 x 64 per process; 16667 training")


def test_every_process_needs_a_training_image():
    check = batch_split(Config(batch_size=1, batch_mode="per_device", val_size=59998), 3)
    assert check.status == FAIL and check.detail.startswith("3 processes for 2 training images")


def test_the_resume_point_is_what_training_would_take(tmp_path, saver):
    cfg = Config(output_dir=str(tmp_path / "run"))
    assert resume_plan(cfg, 1) == resume_plan(cfg, 2)
    assert resume_plan(cfg, 1).status == OK and "does not exist yet" in resume_plan(cfg, 1).detail
    (tmp_path / "run").mkdir()
    assert resume_plan(cfg, 1).detail == f"fresh start in {tmp_path / 'run'} (resume: auto)"
    checkpoint = saver(tmp_path / "run", 100)
    assert resume_plan(cfg, 1) == resume_plan(cfg, 1)  # reads, writes nothing: the same answer again
    assert resume_plan(cfg, 1).detail == f"continues from {checkpoint}"
    check = resume_plan(dataclasses.replace(cfg, resume="none"), 1)
    assert check.status == FAIL and "already holds checkpoints of a run (newest: step-00000100)" in check.detail
    check = resume_plan(dataclasses.replace(cfg, lr=0.1), 1)
    assert check.status == FAIL and "was written with a different config (lr 0.5 -> 0.1)" in check.detail
    check = resume_plan(dataclasses.replace(cfg, batch_mode="per_device"), 2)
    assert check.status == FAIL


def test_a_run_directory_in_use_by_another_run_fails(tmp_path):
    cfg = Config(output_dir=str(tmp_path))
    with RunLock(tmp_path):
        check = resume_plan(cfg, 1)
    assert check.status == FAIL and check.detail.startswith(f"{tmp_path} is in use by another run (pid ")
    assert resume_plan(cfg, 1).status == OK  # released: and the doctor's own look left no lock behind
    assert not (tmp_path / ".lock").exists()


def test_a_finished_run_without_checkpoints_is_refused_as_training_would(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    check = resume_plan(Config(output_dir=str(tmp_path)), 1)
    assert check.status == FAIL and check.detail.startswith(f"{tmp_path} holds a finished run (model.safetensors)")
