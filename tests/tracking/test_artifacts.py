"""The model artifact: final weights, config and metrics, with checksum, accuracy and recipe; logged once."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from mnist_dist.config import build_config, run_keys
from mnist_dist.tracking.artifacts import aliases, already_logged, recipe

from conftest import history, read_metrics, run_cli
from wandb_files import offline_runs, read_wandb_records

pytest.importorskip("wandb", reason="wandb is not installed (these tests read its offline runs)")


def model_artifacts(run_dir: Path) -> list:
    """The ``model`` artifact records of every offline wandb record in a run directory."""
    found = []
    for record in offline_runs(run_dir):
        (log_file,) = record.glob("run-*.wandb")
        found += [
            r.artifact
            for r in read_wandb_records(log_file)
            if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"
        ]
    return found


def test_the_recipe_is_what_trains_the_weights():
    config = build_config("configs/train/best.yaml", {"output_dir": "runs/x", "wandb_tags": "a", "cpu": True}).to_dict()
    kept = recipe(config)
    assert {"lr", "momentum", "weight_decay", "label_smoothing", "augment_rotate", "hidden_sizes", "seed"} <= set(kept)
    assert kept["lr"] == 0.2 and kept["hidden_sizes"] == [256]
    assert not {"output_dir", "data_dir", "resume", "cpu", "log_every", "tracker", "wandb_tags"} & set(kept)
    # What a resume may change is what the recipe leaves out: one rule, from the config's fields.
    assert set(config) - set(kept) == run_keys() and {"compile", "mixed_precision"} <= set(kept)


@pytest.mark.parametrize(
    "split,final,epochs,expected",
    [
        ("test", 0.98, [0.97, 0.98], ["latest"]),  # the test set never picks a model
        ("val", 0.98, [0.97, 0.98], ["latest", "best"]),
        ("val", 0.97, [0.98, 0.97], ["latest"]),  # an earlier epoch scored better
    ],
)
def test_best_needs_a_validation_split_and_the_best_score(split, final, epochs, expected):
    records = [{"kind": "epoch", "step": i, f"{split}/accuracy": a} for i, a in enumerate(epochs)]
    assert aliases({"eval_split": split, f"{split}_accuracy": final}, records) == expected


def test_the_same_weights_are_found_logged():
    records = [{"kind": "artifact", "weights_sha256": "ab" * 32}]
    assert already_logged(records, "ab" * 32) and not already_logged(records, "cd" * 32)


def _train(out: Path, data_dir: Path):
    args = [
        *("mnist_dist.train", "--config", "configs/train/reference.yaml", "--cpu", "--max-steps", "20"),
        *("--batch-size", "512", "--log-every", "10", "--hidden-sizes", "64", "--val-size", "5000"),
        *("--data-dir", str(data_dir), "--output-dir", str(out)),
    ]
    return run_cli(args)


def test_a_run_logs_its_model_once_however_often_it_is_run_again(tmp_path, data_dir):
    out = tmp_path / "run"
    first = _train(out, data_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train(out, data_dir)  # resumes from its final checkpoint, evaluates, writes the same weights
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training ended at this checkpoint" in again.stderr
    assert "the model artifact of these weights" in again.stderr and "was logged before" in again.stderr

    (artifact,) = model_artifacts(out)
    metrics = read_metrics(out / "metrics.json")
    run_id = history(out)[0]["wandb_run_id"]
    assert (artifact.name, sorted(artifact.aliases)) == (f"model-{run_id}", ["best", "latest"])
    metadata = json.loads(artifact.metadata)
    assert metadata["weights_sha256"] == metrics["weights_sha256"]
    assert metadata["val_accuracy"] == metrics["val_accuracy"] and metadata["eval_split"] == "val"
    assert metadata["recipe"]["lr"] == 0.5 and metadata["recipe"]["val_size"] == 5000
    assert "output_dir" not in metadata["recipe"]
    entries = {e.path: e.digest for e in artifact.manifest.contents}
    assert sorted(entries) == ["config.yaml", "metrics.json", "model.safetensors"]
    # wandb's manifest digest: base64 of the file's MD5. (metrics.json was written again since, with
    # the second run's timings: the artifact keeps the first's.)
    for name in ("model.safetensors", "config.yaml"):
        assert entries[name] == base64.b64encode(hashlib.md5((out / name).read_bytes()).digest()).decode()
    markers = [r for r in history(out) if r["kind"] == "artifact"]
    assert [m["weights_sha256"] for m in markers] == [metrics["weights_sha256"]]


def test_a_validation_run_names_its_charts_and_summary_by_the_split(tmp_path, data_dir):
    """A --val-size run's final charts are val/..., and its summary has each metric once, by its logged name."""
    from wandb_files import offline_runs, read_wandb_records, wandb_history

    out = tmp_path / "run"
    proc = _train(out, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = offline_runs(out)
    records = read_wandb_records(next(record.glob("run-*.wandb")))
    logged = {"/".join(key.split("/")[:2]) for _, items in wandb_history(records) for key in items}  # media: nested
    assert {"val/confusion_matrix_table", "val/misclassified", "val/misclassified_table"} <= logged, logged
    assert not any(key.startswith("test/") for key in logged), logged
    summary = {u.key for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert {"val/accuracy", "val/correct", "val/total", "eval_split"} <= summary, summary
    assert not any(key.startswith(("val_", "test_")) for key in summary), summary
