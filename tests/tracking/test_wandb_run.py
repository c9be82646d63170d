"""wandb_run: which wandb run a run logs to, and wandb.init's arguments, found without a network."""

from __future__ import annotations

import pytest

from mnist_dist.config import build_config
from mnist_dist.tracking.wandb_run import choose_run, default_group, has_wandb_credentials, init_kwargs


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
