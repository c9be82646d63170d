"""A whole evaluation job: saved weights, evaluated exactly on the test split, on every process of
the job. ``mnist-dist eval``, ``python -m mnist_dist.evaluate`` and ``accelerate launch -m
mnist_dist.evaluate`` all end up in ``run``; the evaluation itself is ``evaluation.evaluate``.
"""

from __future__ import annotations

from typing import Any

from ..data.loaders import load_datasets, make_loader
from ..distributed.runtime import build_accelerator, end_process_group, setup_logging
from ..evaluation import evaluate
from ..model import MLP, hidden_sizes_from_state_dict
from ..runs import check_output, load_weights, weights_file, write_json


def run(cfg, weights: str, output: str | None = None) -> dict[str, Any]:
    """Evaluate saved weights on the test split (any number of processes); optionally write JSON.

    ``output`` is checked first: never the weights evaluated, nor a file of a run directory
    (:func:`~mnist_dist.runs.check_output`); it is written atomically, by the main process.
    """
    target = check_output(output, (weights_file(weights),), example="eval.json") if output else None
    state = load_weights(weights)
    model = MLP(hidden_sizes_from_state_dict(state))
    model.load_state_dict(state)
    accelerator = build_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    _, test_set = load_datasets(cfg, accelerator, splits=("test",))
    loader = make_loader(
        test_set,
        cfg.eval_batch_size,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        shuffle=False,
        seed=cfg.seed,
    )
    model = accelerator.prepare_model(model, evaluation_mode=True)
    result = evaluate(model, loader, accelerator)
    metrics = {**result.metrics(detailed=True), "world_size": accelerator.num_processes, "weights": str(weights)}
    if target and accelerator.is_main_process:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, metrics)
    accelerator.print(f"test accuracy: {100 * result.accuracy:.2f}% ({result.correct}/{result.total})")
    accelerator.wait_for_everyone()
    end_process_group(accelerator)
    return metrics
