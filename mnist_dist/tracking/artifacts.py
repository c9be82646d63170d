"""A finished run's model as a wandb artifact: its final weights, config and metrics.

The artifact ``model-<wandb run id>`` (type ``model``) holds ``model.safetensors``,
``config.yaml`` and ``metrics.json`` of the run directory; its metadata carries the weights'
SHA-256 (the one ``metrics.json`` records, which loading the weights checks), the accuracy on
the evaluation split and the recipe. Aliases: ``latest``, and ``best`` when the run held out
a validation split and its final weights scored the run's best validation accuracy.

A run that resumes after it finished (the same command again) writes the same weights again:
the history file keeps an ``artifact`` record of what was logged, so the same weights are
logged once. Checkpoints are not logged (docs/tracking.md says why).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..config import run_keys
from ..runs import CONFIG_FILE, HISTORY_FILE, METRICS_FILE, WEIGHTS_FILE
from .history import one_timeline, read_history

log = logging.getLogger("mnist_dist")

ARTIFACT_TYPE = "model"
ARTIFACT_FILES = (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE)


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """The training keys of a config (as ``Config.to_dict`` gives it): what makes the weights what they
    are, every key but those that say where and how the run ran (``config.run_keys``)."""
    left_out = run_keys()
    return {k: v for k, v in config.items() if k not in left_out}


def model_metadata(metrics: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The artifact's metadata: checksum, accuracy on the evaluation split, how long it trained, the recipe."""
    split = metrics.get("eval_split", "test")
    keys = ("weights_sha256", "eval_split", f"{split}_accuracy", f"{split}_loss", "steps", "epochs", "world_size")
    return {**{k: metrics[k] for k in keys if k in metrics}, "recipe": recipe(config)}


def aliases(metrics: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """``latest``; and ``best`` for a run with a validation split whose final weights scored its best
    validation accuracy (the epochs' ``val/accuracy`` in the history). The test set never chooses."""
    names = ["latest"]
    if metrics.get("eval_split") == "val":
        scores = [r["val/accuracy"] for r in records if r.get("kind") == "epoch" and "val/accuracy" in r]
        if metrics["val_accuracy"] >= max(scores, default=0.0):
            names.append("best")
    return names


def already_logged(records: list[dict[str, Any]], digest: str) -> bool:
    """Whether the history's timeline has logged an artifact of the weights with this SHA-256."""
    return any(r.get("kind") == "artifact" and r.get("weights_sha256") == digest for r in records)


def log_model_artifact(run, run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Log the run directory's final files to the wandb ``run`` as its model artifact; what was logged
    (for the history), or None when these weights were logged before."""
    import wandb

    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    digest = metrics["weights_sha256"]
    records = one_timeline(read_history(run_dir / HISTORY_FILE))
    if already_logged(records, digest):
        log.info("wandb: the model artifact of these weights (sha256 %s...) was logged before", digest[:12])
        return None
    artifact = wandb.Artifact(f"model-{run.id}", type=ARTIFACT_TYPE, metadata=model_metadata(metrics, config))
    for name in ARTIFACT_FILES:
        artifact.add_file(str(run_dir / name), name=name)
    names = aliases(metrics, records)
    run.log_artifact(artifact, aliases=names)
    return {"artifact": artifact.name, "aliases": names, "weights_sha256": digest}
