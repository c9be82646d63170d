import math

import pytest
import torch
import yaml

from mnist_dist.runs import load_weights

from conftest import read_metrics, run_cli

FAST = ["--config", "configs/train/reference.yaml", "--cpu"]


def _train(tmp_path, name, data_dir, *extra, processes=1):
    out = tmp_path / name
    proc = run_cli(
        ["mnist_dist.train", *FAST, "--data-dir", str(data_dir), "--output-dir", str(out), *extra], processes=processes
    )
    return out, proc


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
    assert (metrics["steps"], metrics["epochs"], metrics["world_size"], metrics["test_total"]) == (50, 1, 1, 10000)
    assert metrics["test_accuracy"] > 0.7
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 50 and saved["hidden_sizes"] == [64] and saved["lr"] == 0.5
    weights = load_weights(out / "model.safetensors")
    assert weights["layers.0.weight"].shape == (64, 784)
    assert "test accuracy:" in proc.stdout


@pytest.mark.multiprocess
def test_two_processes_follow_the_mathematics_of_one(tmp_path, data_dir):
    """Reference recipe, 100 steps: 1 process (batch 64) == 2 processes (32 each), within 1e-5."""
    one, p1 = _train(tmp_path, "one", data_dir, "--max-steps", "100")
    two, p2 = _train(tmp_path, "two", data_dir, "--max-steps", "100", processes=2)
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stderr[-3000:]
    w1, w2 = load_weights(one / "model.safetensors"), load_weights(two / "model.safetensors")
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff < 1e-5
    m1, m2 = read_metrics(one / "metrics.json"), read_metrics(two / "metrics.json")
    assert (m2["world_size"], m2["per_process_batch_size"], m2["global_batch_size"]) == (2, 32, 64)
    assert abs(m1["test_correct"] - m2["test_correct"]) <= 2
    # Reinitialising with a different seed really changes the weights: the check can fail.
    assert max((w1[k] - load_weights(one / "model.safetensors")[k]).abs().max().item() for k in w1) == 0


@pytest.mark.multiprocess
def test_shuffled_per_device_mode_runs_on_two_processes(tmp_path, data_dir):
    out, proc = _train(
        tmp_path,
        "pd",
        data_dir,
        "--max-steps",
        "30",
        "--shuffle",
        "--batch-mode",
        "per_device",
        "--batch-size",
        "32",
        "--lr-scaling",
        "linear",
        processes=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(out / "metrics.json")
    assert (m["global_batch_size"], m["per_process_batch_size"], m["lr"]) == (64, 32, 1.0)


@pytest.mark.multiprocess
def test_indivisible_global_batch_fails_before_training(tmp_path, data_dir):
    out, proc = _train(tmp_path, "bad", data_dir, "--max-steps", "5", processes=3)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("Error:")]
    assert errors and all("'batch_size' (64) must be divisible by the number of processes (3)" in l for l in errors)
    # The launcher prints its own summary; our processes print the one line and no traceback.
    assert 'File "/' not in "".join(l for l in proc.stderr.splitlines(True) if "mnist_dist" in l)
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


def test_check_gradients_clips_and_refuses_nan():
    from mnist_dist.config import Config
    from mnist_dist.train import NonFiniteError, Progress, check_gradients

    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    params = list(model.parameters())
    check_gradients(params, Config(grad_clip=1.0), Progress())
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert norm == pytest.approx(1.0, rel=1e-5)
    model.bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"not finite at step 8 \(epoch 2\).*--grad-clip"):
        check_gradients(params, Config(), Progress(step=7, epoch=1))
    check_gradients(params, Config(check_finite=False), Progress())  # opted out: no check


@pytest.mark.multiprocess
def test_diverging_lr_stops_all_ranks_with_the_step(tmp_path, data_dir):
    out, proc = _train(tmp_path, "nan", data_dir, "--lr", "1e6", processes=2)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("Error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr[-2000:]
    assert "the loss is not finite at step" in errors[0]
    assert not (out / "model.safetensors").exists()


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


def test_bf16_autocast_trains_and_changes_the_arithmetic(tmp_path, data_dir):
    fp32, p1 = _train(tmp_path, "fp32", data_dir, "--max-steps", "30", "--tracker", "none")
    bf16, p2 = _train(tmp_path, "bf16", data_dir, "--max-steps", "30", "--tracker", "none", "--mixed-precision", "bf16")
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-2000:]
    w1, w2 = load_weights(fp32 / "model.safetensors"), load_weights(bf16 / "model.safetensors")
    assert w2["layers.0.weight"].dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(w1["layers.0.weight"], w2["layers.0.weight"])
    assert read_metrics(bf16 / "metrics.json")["test_accuracy"] > 0.7  # 30 steps: fp32 gets ~0.76 too


def test_compiled_model_saves_plain_weights(tmp_path, data_dir):
    out, proc = _train(tmp_path, "compiled", data_dir, "--max-steps", "20", "--tracker", "none", "--compile", "default")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(load_weights(out / "model.safetensors")) == {
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture (compile reduce-overhead) needs a GPU")
def test_cuda_graph_capture_matches_eager_on_gpu(tmp_path, data_dir):
    eager, p1 = _train(tmp_path, "eager", data_dir, "--max-steps", "50", "--tracker", "none", "--no-cpu")
    graphs, p2 = _train(
        tmp_path,
        "graphs",
        data_dir,
        "--max-steps",
        "50",
        "--tracker",
        "none",
        "--no-cpu",
        "--compile",
        "reduce-overhead",
    )
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-3000:]
    m1, m2 = read_metrics(eager / "metrics.json"), read_metrics(graphs / "metrics.json")
    assert m1["device"] == m2["device"] == "cuda"
    assert abs(m1["test_accuracy"] - m2["test_accuracy"]) < 0.005


# Every recipe feature at once (small numbers, few steps): augmentation with elastic
# distortion, standardisation, warm-up + cosine schedule, label smoothing, Nesterov momentum.
RECIPE = [
    "--tracker",
    "none",
    "--shuffle",
    "--lr",
    "0.1",
    "--momentum",
    "0.9",
    "--nesterov",
    "--lr-schedule",
    "cosine",
    "--warmup-fraction",
    "0.1",
    "--label-smoothing",
    "0.1",
    "--normalize",
    "--augment-translate",
    "2",
    "--augment-rotate",
    "10",
    "--augment-scale",
    "0.1",
    "--augment-shear",
    "10",
    "--augment-elastic",
    "1",
    "--log-every",
    "10",
]


def _lr_history(run_dir):
    import json

    records = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r["lr"]) for r in records if r["kind"] == "step"]


@pytest.mark.multiprocess
def test_full_recipe_on_two_processes_follows_one(tmp_path, data_dir):
    """Each image is augmented the same whatever the split, and the lr moves once per optimizer step."""
    one, p1 = _train(tmp_path, "one", data_dir, "--max-steps", "60", *RECIPE)
    two, p2 = _train(tmp_path, "two", data_dir, "--max-steps", "60", *RECIPE, processes=2)
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert p2.returncode == 0, p2.stderr[-3000:]
    w1, w2 = load_weights(one / "model.safetensors"), load_weights(two / "model.safetensors")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    lrs = _lr_history(one)
    assert lrs == _lr_history(two)
    # Warm-up to 0.1 over 6 steps, then cosine to 0 at step 60: the lr after step 10 and 60.
    assert [s for s, _ in lrs] == [10, 20, 30, 40, 50, 60]
    assert lrs[0][1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 54)))
    assert lrs[-1][1] == pytest.approx(0.0, abs=1e-12)
    m1, m2 = read_metrics(one / "metrics.json"), read_metrics(two / "metrics.json")
    assert abs(m1["test_correct"] - m2["test_correct"]) <= 2


def test_standardised_run_saves_weights_for_raw_pixels(tmp_path, data_dir):
    """The standardisation is folded into the first layer: eval and predict need nothing else."""
    out, proc = _train(tmp_path, "norm", data_dir, "--max-steps", "60", *RECIPE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_weights(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "layers.0.weight": (256, 784),
        "layers.0.bias": (256,),
        "layers.1.weight": (10, 256),
        "layers.1.bias": (10,),
    }
    proc = run_cli(
        [
            "mnist_dist.evaluate",
            "--weights",
            str(out / "model.safetensors"),
            "--cpu",
            "--data-dir",
            str(data_dir),
            "--output",
            str(tmp_path / "eval.json"),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained, evaluated = read_metrics(out / "metrics.json"), read_metrics(tmp_path / "eval.json")
    assert trained["test_accuracy"] > 0.8
    assert evaluated["test_correct"] == trained["test_correct"]


def test_validation_split_replaces_the_test_set(tmp_path, data_dir):
    out, proc = _train(
        tmp_path,
        "val",
        data_dir,
        "--max-steps",
        "20",
        "--hidden-sizes",
        "32",
        "--val-size",
        "5000",
        "--tracker",
        "none",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(out / "metrics.json")
    assert (metrics["eval_split"], metrics["val_total"]) == ("val", 5000)
    assert not any(key.startswith("test_") for key in metrics)
    assert "val accuracy:" in proc.stdout
