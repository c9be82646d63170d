"""The training loop: its mathematics on 1 and N processes, and each recipe feature."""

import math

import pytest
import torch

from mnist_dist.runs import load_weights

from conftest import history, read_metrics, run_cli, train


def _train(tmp_path, name, data_dir, *extra, processes=1):
    return tmp_path / name, train(tmp_path / name, data_dir, *extra, processes=processes)


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
    # The tolerance means something: another seed, after the same 100 steps, is far outside it.
    seed1, p3 = _train(tmp_path, "seed1", data_dir, "--max-steps", "100", "--seed", "1")
    assert p3.returncode == 0, p3.stderr[-3000:]
    w3 = load_weights(seed1 / "model.safetensors")
    assert max((w1[k] - w3[k]).abs().max().item() for k in w1) > 1e-2


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
def test_diverging_lr_stops_all_ranks_with_the_step(tmp_path, data_dir):
    out, proc = _train(tmp_path, "nan", data_dir, "--lr", "1e6", processes=2)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr[-2000:]
    assert "the loss is not finite at step" in errors[0]
    assert not (out / "model.safetensors").exists()


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
    return [(r["step"], r["lr"]) for r in history(run_dir) if r["kind"] == "step"]


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
