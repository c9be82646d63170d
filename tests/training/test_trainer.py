"""The training loop: its mathematics on 1 and N processes, and each recipe feature."""

import math
import re
from pathlib import Path

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
    assert "the loss is not finite at " in errors[0] and "no checkpoint holds those weights" in errors[0]
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
    assert read_metrics(out / "metrics.json")["compiled"] is True
    assert "without torch.compile" not in proc.stderr


def test_compile_without_a_compiler_trains_eagerly_saying_so_once(tmp_path, data_dir):
    """No C++ compiler for inductor's CPU kernels (CXX names one that does not exist): one line, then eager."""
    out = tmp_path / "no-compiler"
    args = ["mnist_dist.train", "--config", "configs/train/reference.yaml", "--cpu", "--data-dir", str(data_dir)]
    args += ["--output-dir", str(out), "--max-steps", "20", "--tracker", "none", "--compile", "default"]
    proc = run_cli(args, processes=2, env={"CXX": "/nonexistent/g++"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "without torch.compile" in line]
    assert len(said) == 1 and "/nonexistent/g++" in said[0] and "set CXX" in said[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert read_metrics(out / "metrics.json")["compiled"] is False


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


# -- the Trainer in this process, from built parts, on a few hundred images --------------------


@pytest.fixture()
def make_trainer(tmp_path, mnist_test):
    """``make_trainer(**config) -> Trainer`` over 256 training and 128 evaluation images of MNIST's
    test split (one process, the CPU, no tracker), in ``tmp_path/run``; its signal handlers are
    restored after the test."""
    from accelerate.state import AcceleratorState

    from mnist_dist.config import build_config
    from mnist_dist.data.loaders import TensorImages
    from mnist_dist.distributed.runtime import build_accelerator
    from mnist_dist.tracking.tracker import Tracker
    from mnist_dist.training.build import assemble
    from mnist_dist.training.checkpoint import CheckpointManager
    from mnist_dist.training.preempt import StopFlags
    from mnist_dist.training.trainer import Trainer

    images, labels = mnist_test
    made = []

    def make(**config):
        AcceleratorState._reset_state(reset_partial_state=True)  # a fresh Accelerator, as a new run has
        base = {"cpu": True, "tracker": "none", "batch_size": 32, "lr": 0.1, "log_every": 4, "epochs": 2}
        cfg = build_config(None, {**base, "output_dir": str(tmp_path / "run"), **config})
        accelerator = build_accelerator(cfg)
        run = Path(cfg.output_dir)
        run.mkdir(parents=True, exist_ok=True)
        train_set, eval_set = TensorImages(images[:256], labels[:256]), TensorImages(images[256:384], labels[256:384])
        parts = assemble(cfg, accelerator, train_set, eval_set, "test")
        tracker = Tracker(cfg, accelerator, run)
        tracker.start(cfg.to_dict())
        stop = StopFlags()
        made.append((stop, tracker))
        return Trainer(cfg, parts, accelerator, tracker, CheckpointManager.from_config(cfg, accelerator, run), stop)

    yield make
    for stop, tracker in made:
        stop.restore()
        tracker.end()


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_one_step_is_one_sgd_step_of_the_cross_entropy(make_trainer):
    import torch.nn.functional as F

    trainer = make_trainer()
    images, labels, indices = next(iter(trainer.parts.train_loader))
    before = _weights(trainer)
    copy = type(trainer.model)(trainer.cfg.hidden_sizes)  # the same step by hand, on a copy of the model
    copy.load_state_dict(before)
    F.cross_entropy(copy(trainer.recipe.inputs(images, indices)), labels).backward()
    with torch.no_grad():
        expected = {k: p - 0.1 * p.grad for k, p in copy.named_parameters()}
    loss = trainer.train_step(images, labels, indices)
    assert loss.item() > 0 and len(labels) == 32
    for key, value in _weights(trainer).items():
        assert torch.allclose(value, expected[key], atol=1e-6), key


def test_an_epoch_evaluates_and_reports_exactly(make_trainer):
    trainer = make_trainer(epochs=1)
    model, metrics, result = trainer.fit()
    assert (metrics["steps"], metrics["epochs"], metrics["test_total"]) == (8, 1.0, 128)  # 256 / 32 steps
    assert metrics["test_correct"] == int(result.confusion.trace()) and 0 < metrics["test_correct"] <= 128
    assert trainer.position.step == 8 and trainer.position.batch == 0 and trainer.position.epoch == 1
    assert model is not None and metrics["test_accuracy"] == metrics["test_correct"] / 128


def test_a_save_and_a_load_continue_exactly(make_trainer):
    straight = make_trainer(epochs=2, max_steps=12)  # 12 steps: 1.5 epochs
    straight.fit()
    final = _weights(straight)

    first = make_trainer(epochs=2, max_steps=5, output_dir=str(straight.checkpoints.run_dir.parent / "split"))
    first.fit()
    saved = first.save_checkpoint()
    second = make_trainer(epochs=2, max_steps=12, output_dir=str(saved.parents[1]))
    point = second.checkpoints.resume_point()  # resume auto: the newest of the run directory
    assert point.path == saved and point.state["progress"]["step"] == 5 and point.state["wandb_run_id"] is None
    second.restore(point)
    assert (second.position.step, second.position.batch) == (5, 5)
    second.fit()
    for key, value in _weights(second).items():
        assert torch.equal(value, final[key]), key


def test_a_stop_vote_saves_a_checkpoint_and_raises_stopped(make_trainer):
    import signal

    from mnist_dist.errors import Stopped

    trainer = make_trainer(epochs=3)
    trainer.stop.received[signal.SIGTERM] = True  # as if SIGTERM arrived: the next log interval votes
    with pytest.raises(Stopped) as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert trainer.position.step == 4  # the first log interval (log_every 4)
    assert (trainer.checkpoints.run_dir / "checkpoints/step-00000004").is_dir()


def test_step_calls_skip_accelerates_wrappers_only_when_they_add_nothing(make_trainer):
    from mnist_dist.training.step import step_calls

    trainer = make_trainer()
    zero_grad, backward, step = step_calls(trainer.optimizer, trainer.accelerator)
    inner = trainer.optimizer.optimizer
    assert step == inner.step  # the plain SGD step, not AcceleratedOptimizer.step
    images, labels, indices = next(iter(trainer.parts.train_loader))
    loss = trainer.model(trainer.recipe.inputs(images, indices)).sum()
    backward(loss)
    assert all(p.grad is not None for p in trainer.model.parameters())
    zero_grad()
    assert all(p.grad is None for p in trainer.model.parameters())  # set_to_none
    trainer.accelerator.gradient_accumulation_steps = 2  # now Accelerate's calls are needed
    zero_grad, backward, step = step_calls(trainer.optimizer, trainer.accelerator)
    assert step == trainer.optimizer.step and backward == trainer.accelerator.backward


def test_a_diverging_run_stops_at_the_next_look_and_no_checkpoint_holds_its_weights(make_trainer):
    from mnist_dist.errors import NonFiniteError

    trainer = make_trainer(lr=1e9, checkpoint_every=3)  # every save looks first, and every log interval (4)
    with pytest.raises(NonFiniteError, match=r"not finite at (?:step|one of steps \d+ to) (\d+) \(epoch 1\)") as stop:
        trainer.fit()
    stopped = int(re.search(r"(\d+) \(epoch 1\)", str(stop.value)).group(1))
    assert trainer.position.step == stopped and "no checkpoint holds those weights" in str(stop.value)
    for saved in (trainer.checkpoints.run_dir / "checkpoints").glob("step-*"):  # those before it: finite
        assert int(saved.name.removeprefix("step-")) < stopped
        assert all(torch.isfinite(w).all() for w in load_weights(saved / "model.safetensors").values())
    exact = make_trainer(lr=1e9, check_finite_each_step=True, output_dir=str(trainer.checkpoints.run_dir) + "-exact")
    with pytest.raises(NonFiniteError, match=r"not finite at step (\d+) \(epoch 1\).*before that step") as stop:
        exact.fit()
    assert exact.position.step == int(re.search(r"at step (\d+)", str(stop.value)).group(1)) - 1  # not taken
