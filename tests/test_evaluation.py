from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mnist_dist.data.loaders import TensorImages, make_loader
from mnist_dist.evaluation import evaluate
from mnist_dist.model import MLP
from mnist_dist.runs import load_weights

from conftest import read_metrics, run_cli


@pytest.fixture(scope="module")
def model(trained_weights):
    m = MLP()
    m.load_state_dict(load_weights(trained_weights))
    return m


def test_single_process_result_matches_a_plain_computation(model, mnist_test):
    from accelerate import Accelerator

    images, labels = mnist_test
    accelerator = Accelerator(cpu=True)
    loader = make_loader(TensorImages(images, labels), 999, num_replicas=1, rank=0, shuffle=False, seed=0)
    result = evaluate(model, loader, accelerator)

    with torch.no_grad():
        logits = model(images.float() / 255)
    pred = logits.argmax(1)
    assert result.total == 10000
    assert result.correct == int((pred == labels).sum())
    assert result.loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    expected = torch.zeros(10, 10, dtype=torch.long)
    for t, p in zip(labels.tolist(), pred.tolist()):
        expected[t, p] += 1
    assert torch.equal(result.confusion, expected)
    assert result.per_class_accuracy[3] == pytest.approx(expected[3, 3].item() / expected[3].sum().item())
    assert result.accuracy > 0.9


def test_evaluate_restores_training_mode(model, mnist_test):
    from accelerate import Accelerator

    images, labels = mnist_test
    loader = make_loader(TensorImages(images[:100], labels[:100]), 30, num_replicas=1, rank=0, shuffle=False, seed=0)
    model.train()
    evaluate(model, loader, Accelerator(cpu=True))
    assert model.training


@pytest.mark.multiprocess
def test_exact_global_accuracy_on_any_world_size(trained_weights, data_dir, tmp_path):
    """1, 3 and 7 processes count each of the 10,000 images once and agree exactly."""
    results = {}
    for world in (1, 3, 7):
        out = tmp_path / f"eval{world}.json"
        proc = run_cli(
            [
                "mnist_dist.evaluate",
                "--weights",
                str(trained_weights),
                "--data-dir",
                str(data_dir),
                "--cpu",
                "--eval-batch-size",
                "512",
                "--output",
                str(out),
            ],
            processes=world,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[world] = read_metrics(out)
    for world, m in results.items():
        assert m["world_size"] == world
        assert m["test_total"] == 10000
        assert m["test_correct"] == results[1]["test_correct"]
        assert m["confusion_matrix"] == results[1]["confusion_matrix"]
        assert sum(map(sum, m["confusion_matrix"])) == 10000
        assert m["test_loss"] == pytest.approx(results[1]["test_loss"], rel=1e-6)
    assert results[1]["test_accuracy"] > 0.9


# --- eval --output never overwrites the run's files or the weights it evaluates ---------------

RUN_TARGETS = [
    "model.safetensors",
    "metrics.json",
    "config.yaml",
    "history.jsonl",
    "checkpoints/step-00000001/model.safetensors",
]


@pytest.fixture()
def run_copy(trained_run_dir, tmp_path) -> Path:
    """A copy of ``trained_run_dir`` with a config, a history and a checkpoint, as training leaves a run."""
    import shutil

    run = tmp_path / "exp"
    shutil.copytree(trained_run_dir, run)
    (run / "config.yaml").write_text("lr: 0.5\n")
    (run / "history.jsonl").write_text('{"kind": "step", "step": 1}\n')
    (run / "checkpoints/step-00000001").mkdir(parents=True)
    shutil.copy(run / "model.safetensors", run / "checkpoints/step-00000001/model.safetensors")
    return run


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path (a new or missing file shows too)."""
    from mnist_dist.runs import sha256_file

    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(output: str) -> str:
    lines = output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("target", [*RUN_TARGETS, "loose weights"])
def test_eval_output_refuses_a_runs_files_and_its_input(run_copy, tmp_path, data_dir, target):
    from click.testing import CliRunner

    from mnist_dist.cli import main

    loose = tmp_path / "loose.safetensors"
    loose.write_bytes((run_copy / "model.safetensors").read_bytes())
    weights, output = (loose, loose) if target == "loose weights" else (run_copy, run_copy / target)
    before = digests(tmp_path)
    args = ["eval", "--weights", str(weights), "--output", str(output), "--cpu", "--data-dir", str(data_dir)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    line = assert_one_error_line(result.output)
    assert f"--output {output} is " in line and "write it elsewhere, e.g. --output " in line
    assert line.endswith("eval.json")
    assert digests(tmp_path) == before


def test_python_m_evaluate_refuses_a_runs_metrics_end_to_end(run_copy, data_dir):
    """The real entry point, in its own process: one line, exit status 1, the run untouched, nothing evaluated."""
    before = digests(run_copy)
    output = run_copy / "metrics.json"
    args = ["mnist_dist.evaluate", "--weights", str(run_copy), "--output", str(output), "--cpu"]
    proc = run_cli([*args, "--data-dir", str(data_dir)], timeout=120)
    assert proc.returncode == 1 and "test accuracy" not in proc.stdout
    assert assert_one_error_line(proc.stderr) == (
        f"Error: --output {output} is the run's metrics and weights checksum ({run_copy} is a run directory); "
        f"write it elsewhere, e.g. --output {run_copy}/eval.json"
    )
    assert digests(run_copy) == before
