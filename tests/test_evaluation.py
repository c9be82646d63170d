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
