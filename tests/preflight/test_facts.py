"""What one process of the preflight sees, on this machine, as it is."""

from pathlib import Path

from mnist_dist.config import build_config
from mnist_dist.preflight.facts import (
    OK,
    WARN,
    data_status,
    devices,
    run_dir_status,
    sees_token,
    slurm,
    versions,
    wandb_plan,
    write_token,
)


def test_versions_and_devices_of_this_process():
    seen = versions()
    assert seen["torch"] != "not installed" and seen["python"].count(".") == 2
    cpu = devices(cpu=True)
    assert cpu["uses"] == "cpu" and cpu["cpus"] >= 1 and cpu["threads"] >= 1


def test_slurm_is_read_from_the_environment_only_inside_a_job():
    assert slurm({}) is None
    job = slurm({"SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4"})
    assert (job["job_id"], job["nnodes"], job["nodeid"], job["gpus_on_node"]) == ("42", "2", "1", "4")


def test_data_present_and_data_missing(data_dir, tmp_path):
    assert data_status(str(data_dir), "mnist") == {
        "raw_dir": str(Path(data_dir) / "MNIST/raw"),
        "missing": [],
        "corrupt": [],
    }
    empty = data_status(str(tmp_path), "mnist")
    assert len(empty["missing"]) == 4 and "train-images-idx3-ubyte" in empty["missing"]


def test_run_directory_writable_or_not(tmp_path):
    ok = run_dir_status(str(tmp_path / "run"))
    assert ok["writable"] and ok["free_bytes"] > 0
    (tmp_path / "file").write_text("x")
    blocked = run_dir_status(str(tmp_path / "file" / "run"))
    assert not blocked["writable"] and "not writable" in blocked["error"]


def test_a_token_is_seen_only_in_the_same_directory(tmp_path):
    path, token = write_token(str(tmp_path))
    assert sees_token(str(path), token)
    assert not sees_token(str(tmp_path / "elsewhere" / path.name), token)
    assert not sees_token(str(path), "another token")


def test_what_wandb_will_do(tmp_path, monkeypatch):
    assert wandb_plan(build_config(None, {"tracker": "none"}), str(tmp_path)).status == OK
    monkeypatch.setenv("WANDB_MODE", "offline")
    plan = wandb_plan(build_config(None, {}), str(tmp_path))
    assert plan.status == OK and f"wandb sync {tmp_path / 'wandb' / 'offline-run-*'}" in plan.detail
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_plan(build_config(None, {}), str(tmp_path)).status == WARN  # online without credentials
