import ast
from pathlib import Path

import pytest
import torch

from mnist_dist.model import MLP, hidden_sizes_from_state_dict


def test_default_shapes_are_784_256_10():
    model = MLP()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (256, 784),
        "layers.0.bias": (256,),
        "layers.1.weight": (10, 256),
        "layers.1.bias": (10,),
    }


def test_forward_matches_formula():
    torch.manual_seed(0)
    model = MLP()
    x = torch.rand(5, 28, 28)
    w_h, b_h = model.layers[0].weight, model.layers[0].bias
    w_o, b_o = model.layers[1].weight, model.layers[1].bias
    expected = torch.relu(x.reshape(5, -1) @ w_h.T + b_h) @ w_o.T + b_o
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("hidden", [(256,), (512, 128), (32, 32, 32)])
def test_hidden_sizes_round_trip(hidden):
    model = MLP(hidden)
    assert model(torch.rand(3, 784)).shape == (3, 10)
    assert hidden_sizes_from_state_dict(model.state_dict()) == hidden


def test_hidden_sizes_from_foreign_state_dict_is_clear():
    with pytest.raises(ValueError, match="not an MLP"):
        hidden_sizes_from_state_dict({"fc.weight": torch.zeros(1)})


def test_model_module_imports_only_torch():
    tree = ast.parse(Path(__import__("mnist_dist.model").model.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "__future__", "collections"}, roots
