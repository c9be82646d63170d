"""A whole training job, as launched: the run directory it writes, what stops it before any training,
and a job that loses a rank."""

import pytest
import yaml

from mnist_dist.runs import load_weights

from conftest import read_metrics, run_cli, train


def _train(tmp_path, name, data_dir, *extra, processes=1):
    return tmp_path / name, train(tmp_path / name, data_dir, *extra, processes=processes)


def test_short_run_writes_the_run_directory(tmp_path, data_dir):
    out, proc = _train(tmp_path, "one", data_dir, "--max-steps", "50", "--hidden-sizes", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out / "metrics.json")
    for key in (
        "test_accuracy",
        "test_correct",
        "test_total",
        "test_loss",
        "world_size",
        "train_seconds",
        "epochs",
        "steps",
    ):
        assert key in metrics
    assert (metrics["steps"], metrics["epochs"], metrics["world_size"], metrics["test_total"]) == (50, 0.0533, 1, 10000)
    assert metrics["test_accuracy"] > 0.7
    # The warm-up (the first steps: start-up, compilation) apart from the steady time per step.
    assert metrics["warmup_steps"] == 10 and 0 < metrics["warmup_seconds"] < metrics["train_seconds"]
    steady = (metrics["train_seconds"] - metrics["warmup_seconds"]) / (50 - 10)
    assert metrics["steady_step_seconds"] == pytest.approx(steady)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 50 and saved["hidden_sizes"] == [64] and saved["lr"] == 0.5
    weights = load_weights(out / "model.safetensors")
    assert weights["layers.0.weight"].shape == (64, 784)
    assert "test accuracy:" in proc.stdout


@pytest.mark.multiprocess
def test_indivisible_global_batch_fails_before_training(tmp_path, data_dir):
    out, proc = _train(tmp_path, "bad", data_dir, "--max-steps", "5", processes=3)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors and all(
        "'batch_size' (64) must be divisible by the number of processes (3)" in line for line in errors
    )
    # The launcher prints its own summary; our processes print the one line and no traceback.
    assert 'File "/' not in "".join(line for line in proc.stderr.splitlines(True) if "mnist_dist" in line)
    assert not (out / "model.safetensors").exists() and not (out / "config.yaml").exists()


def test_config_typo_is_one_line_naming_the_key(tmp_path, data_dir):
    bad = tmp_path / "typo.yaml"
    bad.write_text("epochs: 1\nlearning_rate: 0.1\n")
    proc = run_cli(["mnist_dist.train", "--config", str(bad), "--output-dir", str(tmp_path / "o")])
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"Error: unknown config key 'learning_rate' in {bad}; did you mean 'lr'?"
    ]
    assert "Traceback" not in proc.stderr


def test_unwritable_output_dir_fails_before_training(tmp_path, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli(["mnist_dist.train", "--cpu", "--data-dir", str(data_dir), "--output-dir", str(blocker / "run")])
    assert proc.returncode != 0
    assert "is not writable" in proc.stderr and "--output-dir" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multiprocess
def test_a_killed_rank_ends_the_whole_job_quickly(tmp_path, data_dir):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    out = tmp_path / "kill"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate/cpu.yaml"),
        "-m",
        "mnist_dist.train",
        "--cpu",
        "--epochs",
        "50",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(out),
    ]
    launcher = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    ranks = []
    while time.time() < deadline and len(ranks) < 2:  # wait for training to be under way
        time.sleep(1)
        found = subprocess.run(
            ["pgrep", "-f", f"mnist_dist.train --cpu --epochs 50 --data-dir {data_dir} --output-dir {out}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        ranks = [int(p) for p in found if int(p) != launcher.pid]
    assert len(ranks) == 2, "training processes did not start"
    time.sleep(3)
    import os

    os.kill(ranks[1], signal.SIGKILL)
    start = time.time()
    launcher.communicate(timeout=90)
    assert launcher.returncode != 0 and time.time() - start < 90
    time.sleep(1)
    leftover = [p for p in ranks if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read()]
    assert not leftover


@pytest.mark.multiprocess
@pytest.mark.parametrize("processes", [1, 2])
def test_a_second_command_on_a_run_directory_in_use_ends_at_once_touching_nothing(processes, tmp_path, data_dir):
    """A resubmitted job while the first still runs: one line naming the holder; the first ends as if alone."""
    import os
    import signal

    from conftest import file_digests, history, process_tree, read_until, start
    from wandb_files import offline_runs

    run = tmp_path / "run"
    args = [
        "mnist_dist.train",
        *("--config", "configs/train/reference.yaml", "--cpu", "--max-steps", "1200", "--log-every", "50"),
        *("--checkpoint-every", "300", "--data-dir", str(data_dir), "--output-dir", str(run)),
    ]
    first = start(args, processes)
    lines = read_until(first, "samples/s")
    tree = process_tree(first.pid)
    for pid in tree:  # hold the first still, so that any byte the second writes would show
        os.kill(pid, signal.SIGSTOP)
    try:
        before = file_digests(run)
        second = run_cli(args, processes, port=29517, timeout=120)
        after = file_digests(run)
    finally:
        for pid in tree:
            os.kill(pid, signal.SIGCONT)
    output = "".join(lines) + first.communicate(timeout=300)[0]
    assert first.returncode == 0, output[-3000:]
    errors = sorted({line for line in second.stderr.splitlines() if line.startswith("Error:")})
    assert second.returncode == 1 and len(errors) == 1, second.stderr[-3000:]
    holder = int(errors[0].split("(pid ")[1].split()[0])
    assert "is in use by another run" in errors[0] and holder in tree, errors
    frames = [line for line in second.stderr.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "mnist_dist" in f]  # the launcher's own report may follow; ours is one line
    assert "Traceback" not in second.stderr or processes > 1
    assert after == before  # the second command wrote nothing, removed nothing
    steps = [r["step"] for r in history(run) if r["kind"] == "step"]
    assert steps == list(range(50, 1201, 50))  # the first run's history: every step once
    assert len(offline_runs(run)) == 1  # one wandb run
    assert not (run / ".lock").exists()  # released at the end
