"""Checkpoints and resume: a run stopped by SIGTERM and resumed ends bit-identical to one
that was never stopped; a save killed half-way is never loaded; a resume that would change
the mathematics is refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_metrics, run_cli
from mnist_dist import checkpoint
from mnist_dist.config import Config
from mnist_dist.loaders import TensorImages, make_loader
from mnist_dist.runs import load_weights

# Long enough to be stopped mid-epoch (938 steps per epoch on one process) and to cross an epoch end.
STEPS = 2500


def train_args(data_dir, out: Path, *extra: str) -> list[str]:
    return ["mnist_dist.train", "--config", "configs/train/reference.yaml", "--max-steps", str(STEPS),
            "--log-every", "7", "--tracker", "none", "--data-dir", str(data_dir), "--output-dir", str(out), *extra]


def launch_command(args: list[str], processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", str(processes),
            "--num_cpu_threads_per_process", "1", "-m", *args]


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("train_seconds", "eval_seconds")}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


@pytest.mark.multiprocess
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_at_a_random_step_then_resume_is_bit_identical(processes, data_dir, tmp_path):
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 1.0)
    stopped = tmp_path / "stopped"
    # Stop it: SIGTERM to the command the user ran (python, or accelerate launch, which passes it on).
    proc = subprocess.Popen(launch_command(train_args(data_dir, stopped), processes), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for line in proc.stdout:  # training has begun once the first progress line is out
        lines.append(line)
        if "samples/s" in line:
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    output = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, output[-3000:]
    assert "stopped by SIGTERM at step" in output, f"seed {seed}: " + output[-3000:]
    [saved] = [c for c in checkpoint.complete_checkpoints(stopped) if "stopped by SIGTERM at step "
               f"{checkpoint.read_state(c)['progress']['step']};" in output]
    at = checkpoint.read_state(saved)["progress"]
    assert 0 < at["step"] < STEPS and at["step"] % 7 == 0, at  # stopped at an agreed log interval
    assert not (stopped / "metrics.json").exists()

    resumed = run_cli(train_args(data_dir, stopped), processes)  # resume: auto
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved}" in resumed.stderr
    straight = run_cli(train_args(data_dir, tmp_path / "straight"), processes)
    assert straight.returncode == 0, straight.stderr[-3000:]

    assert_same_weights(stopped / "model.safetensors", tmp_path / "straight/model.safetensors")
    a, b = read_metrics(stopped / "metrics.json"), read_metrics(tmp_path / "straight/metrics.json")
    assert untimed(a) == untimed(b)
    history = [json.loads(line) for line in (stopped / "history.jsonl").read_text().splitlines()]
    assert {"kind": "resume", "step": at["step"]}.items() <= history[[h["kind"] for h in history].index("resume")].items()
    print(f"{processes} process(es): stopped at step {at['step']} (epoch {at['epoch'] + 1}, batch {at['batch']}), "
          f"delay {delay:.2f} s (seed {seed}); resumed run bit-identical")


def test_resuming_a_finished_run_changes_nothing(data_dir, tmp_path):
    args = ["mnist_dist.train", "--max-steps", "40", "--tracker", "none", "--data-dir", str(data_dir),
            "--output-dir", str(tmp_path)]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (tmp_path / "model.safetensors").read_bytes(), read_metrics(tmp_path / "metrics.json")
    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr and "samples/s" not in again.stderr  # no step trained
    assert (tmp_path / "model.safetensors").read_bytes() == before[0]
    after = read_metrics(tmp_path / "metrics.json")
    assert untimed(after) == untimed(before[1]) and after["train_seconds"] == before[1]["train_seconds"]


def test_refusals_are_one_line_and_keep_the_checkpoints(data_dir, tmp_path):
    args = ["mnist_dist.train", "--max-steps", "20", "--tracker", "none", "--data-dir", str(data_dir),
            "--output-dir", str(tmp_path)]
    assert run_cli(args).returncode == 0
    kept = checkpoint.complete_checkpoints(tmp_path)
    for extra, expected in [
        (["--resume", "none"], "already holds checkpoints of a run"),
        (["--lr", "0.1"], "lr 0.5 -> 0.1"),
        (["--lr-schedule", "cosine"], "lr_schedule 'constant' -> 'cosine'"),
        (["--resume", str(tmp_path / "nowhere")], "no such checkpoint directory"),
    ]:
        proc = run_cli([*args, *extra])
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].startswith("Error: ") and expected in proc.stderr, proc.stderr
    assert checkpoint.complete_checkpoints(tmp_path) == kept


# -- the checkpoint files themselves, in this process ------------------------------------

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
    proc = subprocess.run([sys.executable, "-c", SAVER, str(tmp_path), crash], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    root = checkpoint.checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-00000020", "step-00000010"]
    cfg = Config(output_dir=str(tmp_path))
    assert checkpoint.resolve(cfg, tmp_path) == root / "step-00000010"  # the previous one
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.resolve(Config(resume=str(root / ".tmp-step-00000020")), tmp_path)


def test_a_checkpoint_with_a_damaged_file_is_skipped(tmp_path, caplog):
    proc = subprocess.run([sys.executable, "-c", SAVER, str(tmp_path), "none"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    root = checkpoint.checkpoints_dir(tmp_path)
    newest = root / "step-00000020"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, e.g. by a full disk
    assert checkpoint.complete_checkpoints(tmp_path) == [root / "step-00000010"]
    assert "model.safetensors has 1000 bytes" in caplog.text


def test_keeps_the_newest_checkpoints(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3, 4):
        state = {"progress": {"step": step, "epoch": 0, "batch": step, "train_seconds": 0.0}, "world_size": 1,
                 "config": {}, "scheduler": None, "wandb_run_id": None}
        checkpoint.save(accelerator, tmp_path, state, {}, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert sorted(p.name for p in checkpoint.checkpoints_dir(tmp_path).iterdir()) == ["step-00000003",
                                                                                    "step-00000004"]
    del model


def test_compatibility_rules(tmp_path):
    saved = {"world_size": 2, "config": Config().to_dict(), "progress": {"epoch": 3, "step": 2814}}
    checkpoint.check_compatible(saved, Config(output_dir="elsewhere", log_every=5, epochs=20), 2, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="written by 2 process"):
        checkpoint.check_compatible(saved, Config(), 1, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="momentum 0.0 -> 0.9"):
        checkpoint.check_compatible(saved, Config(momentum=0.9), 2, tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="beyond this run"):
        checkpoint.check_compatible(saved, Config(epochs=2), 2, tmp_path)
    cosine = {**saved, "config": Config(lr_schedule="cosine").to_dict()}
    with pytest.raises(checkpoint.CheckpointError, match="epochs 10 -> 20"):  # the schedule depends on the length
        checkpoint.check_compatible(cosine, Config(lr_schedule="cosine", epochs=20), 2, tmp_path)


def test_loader_skips_the_batches_already_seen_once():
    data = TensorImages(torch.zeros(10, 1, dtype=torch.uint8), torch.arange(10))
    loader = make_loader(data, 3, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader.batch_sampler.sampler.set_epoch(1)
    full = [labels.tolist() for _, labels, _ in loader]
    loader.batch_sampler.skip_next(2)
    assert [labels.tolist() for _, labels, _ in loader] == full[2:]
    assert [labels.tolist() for _, labels, _ in loader] == full  # the pass after starts at 0
