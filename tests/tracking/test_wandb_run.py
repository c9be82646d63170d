"""wandb_run: which wandb run a run logs to, and wandb.init's arguments, found without a network."""

from __future__ import annotations

import os
import signal

import pytest

from mnist_dist.config import build_config
from mnist_dist.tracking.wandb_run import (
    choose_run,
    default_group,
    has_wandb_credentials,
    init_kwargs,
    trial_config,
)

from conftest import REPO


def test_group_ties_a_slurm_job_together(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert default_group(tmp_path / "r") == "slurm-4242"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert default_group(tmp_path / "r") == "r"


def test_credentials_are_found_without_network(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not has_wandb_credentials()
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert has_wandb_credentials()


@pytest.mark.parametrize(
    "case,expected",
    [
        ("fresh", ("new", None)),
        ("resumed, nothing logged past the checkpoint", ("resume", "ckpt1234")),
        ("resumed after a crash that logged past it", ("rewind", "ckpt1234")),
        ("crashed before its first checkpoint", ("rewind", "first999")),
        ("finished before, started afresh", ("new", None)),
    ],
)
def test_which_wandb_run_a_run_continues(tmp_path, case, expected):
    history = {
        "fresh": [],
        "resumed, nothing logged past the checkpoint": [
            {"kind": "config", "wandb_run_id": "ckpt1234"},
            {"kind": "step", "step": 100},
        ],
        "resumed after a crash that logged past it": [
            {"kind": "config", "wandb_run_id": "ckpt1234"},
            {"kind": "step", "step": 100},
            {"kind": "step", "step": 150},
        ],
        "crashed before its first checkpoint": [
            {"kind": "config", "wandb_run_id": "first999"},
            {"kind": "step", "step": 50},
        ],
        "finished before, started afresh": [
            {"kind": "config", "wandb_run_id": "old77777"},
            {"kind": "summary", "step": 9380},
        ],
    }[case]
    resumed = None
    if case.startswith("resumed"):
        resumed = {"progress": {"step": 100}, "wandb_run_id": "ckpt1234"}
    cfg = build_config(None, {"output_dir": str(tmp_path)})
    run_id, how = choose_run(cfg, tmp_path, 100 if resumed else 0, resumed, history, None)
    assert how == expected[0]
    assert run_id == expected[1] if expected[1] else len(run_id) == 8 and run_id.isalnum()


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_without_credentials_the_run_is_logged_offline(no_credentials, tmp_path, caplog):
    cfg = build_config(None, {"wandb_tags": "a,b", "wandb_group": "g"})
    with caplog.at_level("INFO", logger="mnist_dist"):
        kwargs = init_kwargs(cfg, tmp_path, "abcd1234", "new", 0)
    assert (kwargs["mode"], kwargs["id"], kwargs["group"], kwargs["tags"]) == ("offline", "abcd1234", "g", ["a", "b"])
    assert kwargs["dir"] == str(tmp_path) and "resume_from" not in kwargs and "resume" not in kwargs
    assert f"wandb sync {tmp_path / 'wandb' / 'offline-run-*'}" in caplog.text
    assert (kwargs["settings"].init_timeout, kwargs["settings"].finish_timeout) == (60.0, 60.0)
    assert "init_timeout" in kwargs["settings"].model_fields_set


def test_a_continued_run_is_resumed_or_rewound_by_its_id(no_credentials, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice: no offline fallback
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")  # and wandb's own timeout is left to the environment
    cfg = build_config()
    resumed = init_kwargs(cfg, tmp_path, "abcd1234", "resume", 300)
    assert (resumed["id"], resumed["resume"], "mode" in resumed) == ("abcd1234", "allow", False)
    rewound = init_kwargs(cfg, tmp_path, "abcd1234", "rewind", 300)
    assert rewound["resume_from"] == "abcd1234?_step=300" and "id" not in rewound
    assert "init_timeout" not in rewound["settings"].model_fields_set  # wandb.init reads WANDB_INIT_TIMEOUT itself


# -- the offline fallback ---------------------------------------------------------------


def test_only_a_run_meant_to_be_online_falls_back_offline(monkeypatch):
    from mnist_dist.tracking.wandb_run import can_fall_back_offline, offline_kwargs

    monkeypatch.setenv("WANDB_MODE", "online")
    assert can_fall_back_offline({"id": "abcd1234"})
    assert not can_fall_back_offline({"id": "abcd1234", "mode": "offline"})  # no credentials: offline already
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not can_fall_back_offline({"id": "abcd1234"})
    rewound = {"resume_from": "abcd1234?_step=300", "dir": "d", "group": "g"}
    assert offline_kwargs(rewound, "abcd1234") == {"dir": "d", "group": "g", "id": "abcd1234", "mode": "offline"}
    resumed = offline_kwargs({"id": "abcd1234", "resume": "allow", "dir": "d"}, "abcd1234")
    assert resumed == {"dir": "d", "id": "abcd1234", "mode": "offline"}


# -- wandb sweeps: what `wandb agent` hands a trial ---------------------------------------

SWEEP = REPO / "configs/sweep/best.yaml"


@pytest.fixture
def under_agent(monkeypatch):
    """The environment ``wandb agent`` gives the command of a trial (run id trial777 of sweep sw42)."""
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw42")
    monkeypatch.setenv("WANDB_RUN_ID", "trial777")
    return "trial777"


def test_a_sweep_trial_gets_a_run_directory_of_its_own(under_agent, monkeypatch):
    assert trial_config(build_config()).output_dir == "runs/sweep-trial777"
    assert trial_config(build_config(None, {"output_dir": "elsewhere"})).output_dir == "elsewhere"
    monkeypatch.delenv("WANDB_SWEEP_ID")  # a run id alone (no agent): the usual default
    assert trial_config(build_config()).output_dir == "runs/default"


def test_a_sweep_trial_logs_to_the_agents_run(under_agent, tmp_path):
    cfg = build_config(None, {"output_dir": str(tmp_path)})
    assert choose_run(cfg, tmp_path, 0, None, [], None) == ("trial777", "new")
    mine = {"progress": {"step": 100}, "wandb_run_id": "trial777"}
    logged = [{"kind": "config", "wandb_run_id": "trial777"}, {"kind": "step", "step": 100}]
    assert choose_run(cfg, tmp_path, 100, mine, logged, None) == ("trial777", "resume")  # preempted, resumed
    other = {"progress": {"step": 100}, "wandb_run_id": "other999"}
    assert choose_run(cfg, tmp_path, 100, other, logged, None) == ("trial777", "new")
    kwargs = init_kwargs(cfg, tmp_path, "trial777", "new", 0)
    assert "id" not in kwargs  # wandb takes WANDB_RUN_ID itself under an agent


def _sweep() -> dict:
    import yaml

    return yaml.safe_load(SWEEP.read_text())


def _trials(sweep: dict) -> list[dict]:
    """Values of every parameter, as the sweep's server could choose them: each of a parameter's
    ``values``, or its distribution's bounds."""
    trials = []
    for name, spec in sweep["parameters"].items():
        for value in spec.get("values") or [spec["min"], spec["max"]]:
            trials.append({n: {"value": value if n == name else _first(s)} for n, s in sweep["parameters"].items()})
    return trials


def _first(spec: dict):
    return spec["values"][0] if "values" in spec else spec["min"]


def agent_command(sweep: dict, args: dict, env: dict) -> list[str]:
    """The command ``wandb agent`` runs for a trial with ``args`` (made by wandb's own functions)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        command = sweep_utils.create_sweep_command(list(sweep["command"]))
    macros = sweep_utils.create_sweep_command_args({"args": args})
    macros.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
    argv = []
    for part in map(str, command):
        argv += macros.get(part[2:-1]) or [] if part.startswith("${") and part.endswith("}") else [part]
    return argv


LAUNCH_ENV = {"LAUNCH_CONFIG": "configs/accelerate/cpu.yaml", "PROCS_PER_NODE": "2", "MAIN_PORT": "29511"}


def test_the_sweep_command_trains_each_trial_on_the_validation_split(monkeypatch):
    """Every value the sweep may choose becomes a valid option of `accelerate launch -m mnist_dist.train`."""
    from mnist_dist.cli import train_command

    sweep = _sweep()
    assert sweep["metric"] == {"name": "val/accuracy", "goal": "maximize"}
    monkeypatch.chdir(REPO)
    for args in _trials(sweep):
        argv = agent_command(sweep, args, LAUNCH_ENV)
        launcher, train = argv[: argv.index("mnist_dist.train")], argv[argv.index("mnist_dist.train") + 1 :]
        assert launcher == [
            *("/usr/bin/env", "accelerate", "launch", "--config_file", "configs/accelerate/cpu.yaml"),
            *("--num_processes", "2", "--main_process_port", "29511", "-m"),
        ]
        params = train_command.make_context("train", train).params
        cfg = build_config(params.pop("config_path"), params)
        assert cfg.val_size == 5000 and cfg.nesterov and cfg.epochs == 30  # best.yaml, on the validation split
        for name, spec in args.items():
            assert getattr(cfg, name) == spec["value"], name  # the sweep's names are the config's keys


def test_the_sweep_job_runs_one_agent_per_array_task(tmp_path):
    """launch/sweep.sbatch outside SLURM, with a stand-in `wandb` that shows what it was started with."""
    import subprocess

    fake = tmp_path / "bin" / "wandb"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/bash\necho "args: $*"\necho "launch: $LAUNCH_CONFIG $PROCS_PER_NODE $MAIN_PORT"\n'
        "grep SigIgn /proc/self/status\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "VIRTUAL_ENV": "set", "MAIN_PORT": "29512"}
    env.pop("SLURM_JOB_ID", None)
    script = str(REPO / "launch/sweep.sbatch")
    proc = subprocess.run(["bash", script, "me/mnist-dist/sw42"], env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("mnist-dist: sweep me/mnist-dist/sw42, array task none: 1 node")
    assert "args: agent --count 1 me/mnist-dist/sw42" in lines
    (launch,) = [line for line in lines if line.startswith("launch: ")]  # exported for the sweep's command
    assert launch.startswith("launch: configs/accelerate/") and launch.endswith(" 29512")
    ignored = int(next(line for line in lines if line.startswith("SigIgn")).split()[1], 16)
    assert ignored & (1 << (signal.SIGUSR1 - 1))  # the agent outlives SIGUSR1; its launcher forwards it
    missing = subprocess.run(["bash", script], env=env, capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 2 and "no sweep: pass its id" in missing.stderr


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _rank_commands(pid: int) -> dict[int, tuple[list[str], dict[str, str]]]:
    """``{rank: (command line, environment)}`` of the training processes below ``pid``."""
    from pathlib import Path

    from conftest import process_tree

    found = {}
    for child in process_tree(pid):
        try:
            environ = dict(
                item.split("=", 1) for item in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in item
            )
            argv = Path(f"/proc/{child}/cmdline").read_text().split("\0")
        except OSError:  # ended meanwhile
            continue
        if "RANK" in environ and "mnist_dist.train" in argv:
            found[int(environ["RANK"])] = (argv, environ)
    return found


@pytest.mark.multiprocess
def test_a_sweep_trial_on_two_processes(tmp_path, data_dir):
    """What `wandb agent` starts for a trial, offline: its environment and --key=value options.
    The trial logs to the agent's run, every rank trains with its values, in runs/sweep-<run id>."""
    import json
    import subprocess
    import sys

    from wandb.sdk.lib import config_util

    from conftest import read_until
    from wandb_files import offline_runs, read_wandb_records, wandb_config

    sweep = _sweep()
    args = {name: {"value": _first(spec)} for name, spec in sweep["parameters"].items()}
    args.update({"lr": {"value": 0.07}, "weight_decay": {"value": 0.0003}})
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the agent runs in the repository: relative paths
    param_file = tmp_path / "wandb/sweep-sw42/config-trial777.yaml"  # where the agent writes the trial's values
    param_file.parent.mkdir(parents=True)
    config_util.save_config_file_from_dict(str(param_file), args)
    agent_env = {"WANDB_SWEEP_ID": "sw42", "WANDB_RUN_ID": "trial777", "WANDB_PROJECT": "mnist-dist"}
    agent_env["WANDB_SWEEP_PARAM_PATH"] = str(param_file)
    launch = {**LAUNCH_ENV, "LAUNCH_CONFIG": str(REPO / "configs/accelerate/cpu.yaml"), "MAIN_PORT": _free_port()}
    argv = agent_command(sweep, args, launch)
    assert argv[:3] == ["/usr/bin/env", "accelerate", "launch"]
    argv = [sys.executable, "-m", "accelerate.commands.launch", *argv[3:], "--max-steps=20", "--log-every=10"]
    env = {**os.environ, **agent_env, "MNIST_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        read_until(proc, "training mnist on 2 process(es)")
        ranks = _rank_commands(proc.pid)
        output = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert sorted(ranks) == [0, 1]
    for command, environ in ranks.values():  # every rank: the trial's values and the agent's run
        assert {"--lr=0.07", "--weight_decay=0.0003", "--val-size", "5000"} <= set(command)
        assert environ["WANDB_RUN_ID"] == "trial777"

    run_dir = tmp_path / "runs/sweep-trial777"
    saved = (run_dir / "config.yaml").read_text()
    assert "lr: 0.07\n" in saved and "weight_decay: 0.0003\n" in saved and "val_size: 5000\n" in saved
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["eval_split"], metrics["world_size"], metrics["lr"]) == ("val", 2, 0.07)
    (record,) = offline_runs(run_dir)
    assert record.name.endswith("-trial777")
    records = read_wandb_records(next(record.glob("run-trial777.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    swept = {u.key: json.loads(u.value_json) for u in run.config.update}  # the agent's values, locked by wandb
    assert (run.run_id, swept["lr"], swept["weight_decay"]) == ("trial777", 0.07, 0.0003)
    config = {**swept, **wandb_config(records)}  # and the run's own, sent by Accelerate: one weight_decay
    assert config["weight_decay"] == 0.0003 and config["batch_size"] == 256 and not any("-" in k for k in swept)
    first = json.loads((run_dir / "history.jsonl").read_text().splitlines()[0])
    assert first["wandb_run_id"] == "trial777"
