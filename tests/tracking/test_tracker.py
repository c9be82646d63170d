"""Tracking: wandb offline by default, one run for N processes, never a failed job because of wandb."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from mnist_dist.config import build_config
from mnist_dist.errors import ConfigError

from conftest import read_metrics, run_cli
from wandb_files import offline_runs, read_wandb_records, wandb_config, wandb_history

pytest.importorskip("wandb", reason="wandb is not installed (these tests read its offline runs)")

# 2 epochs of 118 steps (batch 512): quick, and enough log intervals to see the steps grow.
QUICK = [
    "--config",
    "configs/train/reference.yaml",
    "--cpu",
    "--epochs",
    "2",
    "--batch-size",
    "512",
    "--log-every",
    "20",
    "--hidden-sizes",
    "64",
]


def _train(out: Path, data_dir, *extra, processes=1, env=None):
    return run_cli(
        ["mnist_dist.train", *QUICK, "--data-dir", str(data_dir), "--output-dir", str(out), *extra],
        processes=processes,
        env=env,
    )


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, data_dir):
    """A 2-epoch run without credentials or WANDB_MODE: offline because nothing says otherwise."""
    out = tmp_path_factory.mktemp("offline") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_MODE")
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setenv("NETRC", str(out.parent / "no-netrc"))
        proc = _train(out, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_offline_run_records_config_steps_and_epochs(offline_run):
    out, proc = offline_run
    runs = offline_runs(out)
    assert len(runs) == 1, runs
    assert proc.stderr.count("logging offline") == 1
    assert f"wandb sync {out}/wandb/offline-run-*" in proc.stderr
    (log_file,) = runs[0].glob("run-*.wandb")
    records = read_wandb_records(log_file)

    config = wandb_config(records)
    assert (config["lr"], config["batch_size"], config["epochs"], config["world_size"]) == (0.5, 512, 2, 1)
    assert {"torch", "accelerate", "python"} <= set(config["versions"])

    rows = wandb_history(records)
    steps = [step for step, _ in rows]
    assert steps == sorted(set(steps)), "steps strictly increase"
    loss_steps = [step for step, items in rows if "train/loss" in items]
    assert loss_steps == list(range(20, 237, 20))  # 118 steps per epoch, logged every 20
    epochs = [(step, items) for step, items in rows if "test/accuracy" in items]
    assert [(s, i["epoch"]) for s, i in epochs] == [(118, 1), (236, 2)]
    metrics = read_metrics(out / "metrics.json")
    assert epochs[-1][1]["test/accuracy"] == metrics["test_accuracy"] > 0.85
    assert all(i["train/samples_per_second"] > 0 and i["lr"] == 0.5 for _, i in rows if "train/loss" in i)
    assert any(key.startswith("test/misclassified") for key in rows[-1][1])
    assert any(key.startswith("test/confusion_matrix") for key in rows[-1][1])
    summaries = [r.summary for r in records if r.WhichOneof("record_type") == "summary"]
    summary = {u.key for s in summaries for u in s.update}
    assert "test/accuracy" in summary and "test_accuracy" not in summary  # one name per metric


def test_history_file_mirrors_what_wandb_got(offline_run):
    out, _ = offline_run
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "config" and kinds[-2:] == ["summary", "artifact"] and kinds.count("epoch") == 2
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(20, 237, 20))
    summary = records[-2]
    assert sum(map(sum, summary["confusion_matrix"])) == 10000
    assert summary["test_correct"] == sum(summary["confusion_matrix"][i][i] for i in range(10))

    from safetensors.torch import load_file

    examples = load_file(str(out / "misclassified.safetensors"))
    assert examples["images"].shape == (64, 28, 28)
    assert (examples["predicted"] != examples["label"]).all()
    assert examples["index"].tolist() == sorted(examples["index"].tolist())


def test_the_end_of_a_run_shows_a_table_of_misclassified_digits(offline_run, mnist_test):
    """wandb's table: each digit as an image, label, prediction, top-3 probabilities, index in the test set."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    out, _ = offline_run
    (log_file,) = offline_runs(out)[0].glob("run-*.wandb")
    records = read_wandb_records(log_file)
    assert "test/misclassified_table/_type" in wandb_history(records)[-1][1]
    (table_artifact,) = [
        r.artifact
        for r in records
        if r.WhichOneof("record_type") == "artifact" and "misclassified_table" in r.artifact.name
    ]
    files = {e.path: e.local_path for e in table_artifact.manifest.contents}  # staged for wandb sync
    table = json.loads(Path(files["test/misclassified_table.table.json"]).read_text())
    assert table["columns"] == ["image", "label", "prediction", "top probabilities", "index"]
    examples = load_file(str(out / "misclassified.safetensors"))
    assert len(table["data"]) == 64 and examples["probabilities"].shape == (64, 10)
    images, labels = mnist_test
    for (image, label, prediction, top, index), probabilities in zip(table["data"], examples["probabilities"]):
        assert label == labels[index] != prediction
        assert np.array_equal(np.asarray(Image.open(files[image["path"]])), images[index].numpy())
        shown = [(int(c), float(p.rstrip("%")) / 100) for c, p in (part.split(": ") for part in top.split(", "))]
        assert len(shown) == 3 and shown[0][0] == prediction  # the likeliest class is the prediction
        assert all(abs(probabilities[c] - p) < 0.0006 for c, p in shown)
        assert [p for _, p in shown] == sorted((p for _, p in shown), reverse=True)


def test_unreachable_server_falls_back_to_an_offline_record(tmp_path, data_dir, offline_run):
    """wandb pointed where nothing listens, online forced: the same run recorded offline for wandb sync,
    one warning that says so, exit 0, the same metrics."""
    env = {
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_INIT_TIMEOUT": "1",
    }
    start = time.monotonic()
    out = tmp_path / "run"
    proc = _train(out, data_dir, env=env)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 60
    assert "Traceback" not in proc.stderr and "wandb failed" not in proc.stderr
    run_id = json.loads((out / "history.jsonl").read_text().splitlines()[0])["wandb_run_id"]
    (record,) = offline_runs(out)
    assert record.name.endswith(f"-{run_id}")
    (line,) = [line for line in proc.stderr.splitlines() if "wandb could not start online" in line]
    assert f"logging run {run_id} offline instead; upload later with: wandb sync {record}" in line
    (log_file,) = record.glob(f"run-{run_id}.wandb")
    records = read_wandb_records(log_file)
    assert [s for s, i in wandb_history(records) if "train/loss" in i] == list(range(20, 237, 20))
    assert wandb_config(records)["lr"] == 0.5
    same = read_metrics(offline_run[0] / "metrics.json")
    got = read_metrics(out / "metrics.json")
    keys = ("test_correct", "test_loss", "steps")
    assert {k: got[k] for k in keys} == {k: same[k] for k in keys}


@pytest.mark.multiprocess
def test_two_processes_make_one_wandb_run(tmp_path, data_dir):
    out = tmp_path / "two"
    proc = _train(out, data_dir, "--max-steps", "40", processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = offline_runs(out)
    assert len(runs) == 1, runs
    (log_file,) = runs[0].glob("run-*.wandb")
    records = read_wandb_records(log_file)
    assert wandb_config(records)["world_size"] == 2
    assert [s for s, i in wandb_history(records) if "train/loss" in i] == [20, 40]
    # Every node's system readings reach the one run (wandb's own system metrics are the main process's).
    node = f"nodes/{socket.gethostname()}"
    logged = [i for _, i in wandb_history(records) if "train/loss" in i]
    assert all(0 <= i[f"{node}/cpu_percent"] <= 100 and i[f"{node}/rss_mb"] > 100 for i in logged), logged


@pytest.mark.parametrize("installed", [False, True], ids=["not-installed", "import-fails"])
def test_wandb_that_cannot_be_imported_is_one_warning(tmp_path, monkeypatch, caplog, installed):
    import sys

    from accelerate import Accelerator

    from mnist_dist.tracking import tracker as tracking
    from mnist_dist.tracking.wandb_run import accelerator_log_with

    monkeypatch.setitem(sys.modules, "wandb", None)  # ``import wandb`` raises ImportError
    if installed:  # the package's metadata is there, its import fails
        monkeypatch.setattr(tracking, "wandb_installed", lambda: True)
    accelerator = Accelerator(cpu=True, log_with=accelerator_log_with("wandb"))
    tracker = tracking.Tracker(build_config(None, {"output_dir": str(tmp_path)}), accelerator, tmp_path)
    with caplog.at_level("WARNING", logger="mnist_dist"):
        tracker.start({"lr": 0.5})
        tracker.log_step(10, {"train/loss": 0.5})
        tracker.end()
    (message,) = [r.getMessage() for r in caplog.records]
    expected = "wandb failed to start (ModuleNotFoundError" if installed else "the wandb package is not installed"
    assert expected in message
    assert not tracker.wandb_on and (tmp_path / "history.jsonl").read_text().count("\n") == 2


@pytest.mark.slow  # wandb runs git in-process
def test_disabled_mode_is_a_quiet_no_op(tmp_path, monkeypatch, caplog):
    import torch
    from accelerate import Accelerator

    from mnist_dist.tracking.tracker import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    accelerator = Accelerator(cpu=True, log_with="wandb")
    tracker = Tracker(build_config(None, {"output_dir": str(tmp_path)}), accelerator, tmp_path)
    with caplog.at_level("WARNING", logger="mnist_dist"):
        tracker.start({"lr": 0.5})
        tracker.log_step(10, {"train/loss": 0.5})
        tracker.log_epoch(12, {"test/accuracy": 0.5})
        examples = {
            "images": torch.zeros(2, 28, 28, dtype=torch.uint8),
            "predicted": torch.tensor([1, 2]),
            "label": torch.tensor([7, 7]),
            "index": torch.tensor([3, 5]),
        }
        tracker.finish({"test_accuracy": 0.5}, torch.eye(10, dtype=torch.long), examples)
        tracker.end()
    assert not caplog.records and not offline_runs(tmp_path)
    assert [json.loads(line)["kind"] for line in (tmp_path / "history.jsonl").read_text().splitlines()] == [
        "config",
        "step",
        "epoch",
        "summary",
    ]


@pytest.mark.slow  # wandb starts its service process
def test_a_wandb_failure_mid_run_is_one_warning(tmp_path, monkeypatch, caplog):
    """A wandb call that raises disables wandb for the rest of the run; the history goes on."""
    from accelerate import Accelerator

    from mnist_dist.tracking.tracker import Tracker

    cfg = build_config(None, {"output_dir": str(tmp_path)})
    accelerator = Accelerator(cpu=True, log_with="wandb")
    tracker = Tracker(cfg, accelerator, tmp_path)
    tracker.start({"lr": 0.5})
    tracker.wait_started()  # wandb starts in the background
    assert tracker.wandb_on
    run = accelerator.get_tracker("wandb", unwrap=True)

    def broken(*args, **kwargs):
        raise ConnectionError("socket closed\nmore detail")

    monkeypatch.setattr(run, "log", broken)
    with caplog.at_level("WARNING", logger="mnist_dist"):
        for step in (10, 20, 30):
            tracker.log_step(step, {"train/loss": 1.0 / step})
    assert [r.getMessage() for r in caplog.records if "wandb failed" in r.getMessage()] == [
        f"wandb failed to log (ConnectionError: socket closed); training goes on, the history is in "
        f"{tmp_path / 'history.jsonl'}"
    ]
    assert not tracker.wandb_on and not accelerator.trackers
    monkeypatch.undo()
    run.finish()
    tracker.end()
    steps = [json.loads(line).get("step") for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert steps == [None, 10, 20, 30]


def test_tags_are_words():
    assert build_config(None, {"wandb_tags": "baseline, sgd"}).wandb_tags == ("baseline", "sgd")
    with pytest.raises(ConfigError, match="'wandb_tags' has an empty item"):
        build_config(None, {"wandb_tags": "baseline, sgd,"})
    assert build_config(None, {"wandb_tags": ["a"]}).wandb_tags == ("a",)
    assert build_config().wandb_tags == ()
    with pytest.raises(ConfigError, match="'wandb_tags' must be a list of strings"):
        build_config(None, {"wandb_tags": [1, 2]})
    with pytest.raises(ConfigError, match="'tracker' must be one of wandb, none"):
        build_config(None, {"tracker": "tensorboard"})


def test_a_wandb_start_that_never_returns_is_given_up_in_bounded_time(tmp_path, monkeypatch, caplog):
    """The main process waits for wandb's start at most its init timeout plus a margin, then trains on."""
    import threading

    from accelerate import Accelerator

    from mnist_dist.tracking import tracker as tracking

    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "1")
    monkeypatch.setattr(tracking, "START_MARGIN", 1.0)
    accelerator = Accelerator(cpu=True, log_with="wandb")
    release = threading.Event()
    # A start stuck in wandb (a server that never answers, wandb's own timeout not firing): it
    # returns only when released, long after the bound.
    monkeypatch.setattr(accelerator, "init_trackers", lambda *args, **kwargs: release.wait(30))
    tracker = tracking.Tracker(build_config(None, {"output_dir": str(tmp_path)}), accelerator, tmp_path)
    tracker.start({"lr": 0.5})
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="mnist_dist"):
        tracker.wait_started()
    assert 2 <= time.monotonic() - start < 6
    assert not tracker.wandb_on
    assert [r.getMessage() for r in caplog.records] == [
        f"wandb did not start within 2 s; training goes on without it, the history is in {tmp_path / 'history.jsonl'}"
    ]
    tracker.log_step(10, {"train/loss": 0.5})
    release.set()
    tracker.end()
    assert [json.loads(line)["kind"] for line in (tmp_path / "history.jsonl").read_text().splitlines()] == [
        "config",
        "step",
    ]


def test_a_damaged_history_is_kept_aside_and_training_starts(tmp_path, caplog):
    from accelerate import Accelerator

    from mnist_dist.tracking.tracker import Tracker

    (tmp_path / "history.jsonl").write_text('{"kind": "config"}\nnot json\n{"kind": "step", "step": 7}\n')
    tracker = Tracker(
        build_config(None, {"output_dir": str(tmp_path), "tracker": "none"}), Accelerator(cpu=True), tmp_path
    )
    with caplog.at_level("WARNING", logger="mnist_dist"):
        tracker.start({"lr": 0.5})
        tracker.log_step(10, {"train/loss": 0.5})
    assert "line 2 is not JSON; kept as" in caplog.text
    assert (tmp_path / "history.jsonl.unreadable").read_text().startswith('{"kind": "config"}\nnot json')
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert kinds == ["config", "step"]


@pytest.mark.slow  # wandb starts its service process
def test_a_stopped_sweep_trial_is_marked_preempting(tmp_path, monkeypatch, request):
    """A trial stopped with a checkpoint (SIGUSR1 before the time limit) is to be resumed: wandb's sweep
    hands a run marked preempting to an agent again, and its run directory resumes it."""
    import wandb
    from accelerate import Accelerator

    from mnist_dist.tracking.tracker import Tracker

    monkeypatch.setenv("WANDB_SWEEP_ID", "sw42")
    monkeypatch.setenv("WANDB_RUN_ID", "trial777")
    wandb.teardown()  # wandb reads its environment once per process: as an agent's trial would start
    request.addfinalizer(wandb.teardown)  # and the next test starts without the agent's
    tracker = Tracker(
        build_config(None, {"output_dir": str(tmp_path)}), Accelerator(cpu=True, log_with="wandb"), tmp_path
    )
    tracker.start({"lr": 0.5})
    tracker.log_step(10, {"train/loss": 0.5})
    tracker.end(stopped=True)
    (record,) = offline_runs(tmp_path)
    kinds = [r.WhichOneof("record_type") for r in read_wandb_records(next(record.glob("run-*.wandb")))]
    assert "preempting" in kinds
    assert tracker.run_id == "trial777"


@pytest.mark.slow  # wandb starts its service process
def test_a_refused_rewind_continues_the_run_with_settings_of_its_own(tmp_path):
    """wandb.init writes what it is given into its Settings object; the continuation tried after a
    rewind the server refused must not inherit the rewind's resume_from (wandb refuses resume with it)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from mnist_dist.tracking.tracker import Tracker
    from mnist_dist.tracking.wandb_run import init_kwargs

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = build_config(None, {"output_dir": str(tmp_path)})
    accelerator = Accelerator(cpu=True, log_with="wandb")
    tracker = Tracker(cfg, accelerator, tmp_path)
    rewind = init_kwargs(cfg, tmp_path, "abcd1234", "rewind", 3)
    tracker._init_trackers({"lr": 0.5}, rewind)  # the rewind attempt
    assert accelerator.get_tracker("wandb", unwrap=True).id == "abcd1234"
    continued = {k: v for k, v in rewind.items() if k != "resume_from"} | {"id": "abcd1234", "resume": "allow"}
    tracker._init_trackers({"lr": 0.5}, continued)  # what _init_wandb tries when the rewind is refused
    assert accelerator.get_tracker("wandb", unwrap=True).id == "abcd1234"
    assert rewind["settings"].resume_from is None  # the caller's Settings are left as they were
    tracker.end()
