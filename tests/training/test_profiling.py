"""Profiler traces on demand: the step window's syntax, the traces a real training loop writes, wandb."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mnist_dist.config import parse_steps
from mnist_dist.errors import ConfigError
from mnist_dist.model import MLP
from mnist_dist.training.profiling import StepProfiler, log_to_wandb, trace_files


@pytest.mark.parametrize(
    "text, expected",
    [
        ("200-220", (200, 220)),
        ("3-5", (3, 5)),
        ("1-1", (1, 1)),
        (" 7 - 9 ", (7, 9)),
        ("", None),
        ("none", None),
        ("None", None),
        (None, None),
    ],
)
def test_parse_steps_reads_a_window_or_none(text, expected):
    assert parse_steps(text) == expected


@pytest.mark.parametrize("text", ["abc", "5-3", "0-3", "3", "3-", "-3", "3-5-7", "3..5", "1.5-3"])
def test_parse_steps_refuses_anything_else_in_one_line(text):
    with pytest.raises(ConfigError) as info:
        parse_steps(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config key 'profile_steps' must be FIRST-LAST steps like 200-220")
    assert message.endswith(f"got {text!r}")


def train(profiler: StepProfiler, first_step: int = 1, last_step: int = 12, close: bool = True) -> None:
    """A real tiny training loop, with the profiler's calls where the Trainer puts them."""
    torch.manual_seed(0)
    model = MLP(hidden_sizes=(16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(first_step, last_step + 1):
        profiler.before_step(step)
        loss = F.cross_entropy(model(torch.rand(8, 28, 28)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        profiler.after_step(step)
    if close:
        profiler.close()


def step_marks(path) -> set[str]:
    """The ``step n`` ranges of a Chrome trace (it must be valid JSON with events)."""
    events = json.loads(path.read_text())["traceEvents"]
    assert events
    return {e["name"] for e in events if str(e.get("name", "")).startswith("step ")}


def test_the_window_and_only_it_is_traced(tmp_path):
    profiler = StepProfiler(tmp_path, (3, 5), rank=0, device_type="cpu")
    train(profiler)
    [trace] = trace_files(tmp_path)
    assert trace == tmp_path / "profiles" / "rank-0.steps-3-5.pt.trace.json" == profiler.written
    assert step_marks(trace) == {"step 3", "step 4", "step 5"}
    assert [p.name for p in trace.parent.iterdir()] == [trace.name]  # no temporary file left behind
    profiler.close()  # again: nothing more
    assert trace_files(tmp_path) == [trace]


@pytest.fixture
def no_profiler(monkeypatch):
    """Fails the test if a profiler is created."""

    def refuse(*args, **kwargs):
        raise AssertionError("a profiler was created outside the window")

    monkeypatch.setattr(torch.profiler, "profile", refuse)


@pytest.mark.parametrize("steps", [None, (13, 20)], ids=["no-window", "window-past-the-end"])
def test_no_window_in_the_run_creates_no_profiler_and_no_file(tmp_path, no_profiler, steps):
    train(StepProfiler(tmp_path, steps, rank=0, device_type="cpu"))
    assert trace_files(tmp_path) == [] and not (tmp_path / "profiles").exists()


def test_a_resumed_run_past_the_window_writes_nothing(tmp_path, no_profiler):
    train(StepProfiler(tmp_path, (3, 5), rank=0, device_type="cpu"), first_step=6)
    assert trace_files(tmp_path) == []


def test_close_inside_the_window_writes_the_partial_trace(tmp_path):
    profiler = StepProfiler(tmp_path, (3, 5), rank=1, device_type="cpu")
    train(profiler, last_step=4, close=False)
    assert trace_files(tmp_path) == []  # still profiling: step 5 has not run
    profiler.close()
    [trace] = trace_files(tmp_path)
    assert trace.name == "rank-1.steps-3-4.pt.trace.json"
    assert step_marks(trace) == {"step 3", "step 4"}


def test_a_run_resumed_inside_the_window_profiles_the_rest_of_it(tmp_path):
    train(StepProfiler(tmp_path, (3, 5), rank=0, device_type="cpu"), first_step=4)
    [trace] = trace_files(tmp_path)
    assert trace.name == "rank-0.steps-4-5.pt.trace.json"
    assert step_marks(trace) == {"step 4", "step 5"}


@pytest.mark.slow  # wandb starts its service process
def test_traces_are_attached_to_the_wandb_run_as_a_profile_artifact(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed")
    from wandb_files import read_wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    profiles = tmp_path / "run" / "profiles"
    profiles.mkdir(parents=True)
    for name in ("rank-1.steps-3-5.pt.trace.json", "rank-0.steps-3-5.pt.trace.json"):
        (profiles / name).write_text('{"traceEvents": []}')
    (profiles / ".rank-2.steps-3-5.pt.trace.json.99.tmp").write_text("half")  # a write cut short: not a trace
    assert [p.name for p in trace_files(tmp_path / "run")] == [
        "rank-0.steps-3-5.pt.trace.json",
        "rank-1.steps-3-5.pt.trace.json",
    ]
    log_to_wandb(None, tmp_path / "run")  # no wandb run: nothing to do
    run = wandb.init(dir=tmp_path, mode="offline", project="profiling-test")
    log_to_wandb(run, tmp_path / "run")
    run.finish()
    [log_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    artifacts = [r.artifact for r in read_wandb_records(log_file) if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, a.name) for a in artifacts] == [("profile", f"profile-{run.id}")]
    assert sorted(e.path for e in artifacts[0].manifest.contents) == [
        "rank-0.steps-3-5.pt.trace.json",
        "rank-1.steps-3-5.pt.trace.json",
    ]


def test_a_trace_that_cannot_be_written_is_a_warning_not_a_failed_run(tmp_path, caplog):
    (tmp_path / "profiles").write_text("a file where the directory should be")
    profiler = StepProfiler(tmp_path, (3, 5), rank=0, device_type="cpu")
    train(profiler)
    assert profiler.written is None and "could not write the profiler trace" in caplog.text


@pytest.mark.multiprocess
def test_a_profiled_run_of_two_processes_leaves_a_readable_trace_per_rank_and_attaches_them(data_dir, tmp_path):
    from conftest import run_cli
    from wandb_files import read_wandb_records

    args = ["mnist_dist.train", "--cpu", "--max-steps", "30", "--log-every", "10", "--profile-steps", "10-12"]
    proc = run_cli([*args, "--data-dir", str(data_dir), "--output-dir", str(tmp_path)], processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces = trace_files(tmp_path)
    assert [t.name for t in traces] == [f"rank-{r}.steps-10-12.pt.trace.json" for r in (0, 1)]
    for trace in traces:
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        assert {"step 10", "step 11", "step 12"} <= names and "step 13" not in names
    [offline] = list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    artifacts = [r.artifact for r in read_wandb_records(offline) if r.WhichOneof("record_type") == "artifact"]
    [profile] = [a for a in artifacts if a.type == "profile"]
    assert sorted(e.path for e in profile.manifest.contents) == [t.name for t in traces]
