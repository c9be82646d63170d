import pytest
import torch
import torch.nn.functional as F

from mnist_dist.data.loaders import TensorImages, make_loader
from mnist_dist.evaluation import evaluate, misclassified_examples
from mnist_dist.model import MLP
from mnist_dist.runs import load_weights


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


def test_misclassified_examples_ask_for_the_probabilities_of_those_images_only():
    import torch

    images = torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1).expand(6, 28, 28)
    asked = []

    def probabilities(some):
        asked.append(some[:, 0, 0].tolist())
        return torch.full((len(some), 10), 0.1)

    predictions, labels = torch.tensor([1, 2, 9, 4, 9, 6]), torch.tensor([1, 2, 3, 4, 5, 6])
    examples = misclassified_examples(predictions, images, labels, probabilities)
    assert asked == [[2, 4]] and examples["index"].tolist() == [2, 4]
    assert examples["probabilities"].shape == (2, 10)
    assert "probabilities" not in misclassified_examples(predictions, images, labels)
