"""Which Weights & Biases run a run logs to, and how wandb is started, without a network.

- credentials are looked for where wandb looks (API key, identity token, netrc); without
  them the run is logged offline, for ``wandb sync``;
- a run keeps one wandb run id across restarts (kept in checkpoints and the history), and
  a run resumed behind what it had logged rewinds it (wandb's ``resume_from``);
- every wait of wandb is bounded (``INIT_TIMEOUT``, ``FINISH_TIMEOUT``);
- a command started by ``wandb agent`` (a sweep trial) logs to the agent's run, in a run
  directory of its own.

wandb itself is imported only by :func:`init_kwargs`, when the tracker is wandb.
"""

from __future__ import annotations

import dataclasses
import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import FIELDS
from ..runs import HISTORY_FILE
from .history import last_logged_step, read_history

log = logging.getLogger("mnist_dist")

# Bounds on wandb's waits, so an unreachable server costs at most this much (seconds).
# WANDB_INIT_TIMEOUT / WANDB_FINISH_TIMEOUT in the environment take precedence.
INIT_TIMEOUT, FINISH_TIMEOUT = 60.0, 60.0


def wandb_installed() -> bool:
    """Whether Accelerate will offer its wandb tracker (checked without importing wandb)."""
    from accelerate.utils import is_wandb_available

    return bool(is_wandb_available())


def accelerator_log_with(tracker: str) -> str | None:
    """``log_with`` for the Accelerator: "wandb" if asked for and installed, else None."""
    return "wandb" if tracker == "wandb" and wandb_installed() else None


def has_wandb_credentials() -> bool:
    """An API key, identity token or netrc entry for the wandb server is there (no network)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def default_group(run_dir: Path) -> str:
    """One group for every rank and every requeued restart of a job."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"slurm-{job}" if job else run_dir.resolve().name


def agent_run_id() -> str | None:
    """The run id ``wandb agent`` chose for this command (it sets WANDB_SWEEP_ID and WANDB_RUN_ID), else None."""
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    return None


def trial_config(cfg):
    """``cfg`` for a sweep trial: a run directory of its own, ``runs/sweep-<run id>``, unless
    ``output_dir`` was set (it still has its default). Outside an agent, ``cfg`` itself."""
    trial = agent_run_id()
    default = FIELDS["output_dir"].default
    if trial is None or cfg.output_dir != default:
        return cfg
    return dataclasses.replace(cfg, output_dir=str(Path(default).parent / f"sweep-{trial}"))


def new_run_id() -> str:
    """A fresh wandb run id (8 lowercase letters and digits, as wandb makes them), without importing wandb."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def choose_run(
    cfg, run_dir: Path, at: int, resumed: dict[str, Any] | None, previous: list[dict[str, Any]], checkpoint: Path | None
) -> tuple[str | None, str]:
    """``(wandb run id, how to start it: new, resume or rewind)`` for a run starting at step ``at``.

    The checkpoint's run (``resumed``: its trainer state), rewound if a lost timeline logged
    past ``at``; the run of an attempt that died before its first checkpoint (the same command
    again, ``previous``: the run directory's history); or a new one. Under ``wandb agent``
    always the agent's run: continued as above if it is the one this run directory was logging to.
    """
    if cfg.tracker != "wandb":
        return None, "new"
    trial = agent_run_id()
    if trial is not None:
        run_id, how = _continued_run(cfg, run_dir, at, resumed, previous, checkpoint)
        return trial, how if run_id == trial else "new"
    return _continued_run(cfg, run_dir, at, resumed, previous, checkpoint)


def _continued_run(
    cfg, run_dir: Path, at: int, resumed: dict[str, Any] | None, previous: list[dict[str, Any]], checkpoint: Path | None
) -> tuple[str, str]:
    """The run this run directory's timeline logs to, and how to start it: see :func:`choose_run`."""
    if resumed and resumed.get("wandb_run_id"):
        histories = [previous]
        if checkpoint is not None and Path(checkpoint).resolve().parents[1] != Path(run_dir).resolve():
            histories.append(read_history(Path(checkpoint).parents[1] / HISTORY_FILE))  # resumed from elsewhere
        logged = max(last_logged_step(h) for h in histories)
        return resumed["wandb_run_id"], "rewind" if logged > at else "resume"
    earlier = [r for r in previous if r.get("kind") == "config" and r.get("wandb_run_id")]
    unfinished = not any(r.get("kind") == "summary" for r in previous)
    if not resumed and cfg.resume == "auto" and earlier and unfinished:
        return earlier[-1]["wandb_run_id"], "rewind" if last_logged_step(previous) > 0 else "resume"
    return new_run_id(), "new"


def init_kwargs(cfg, run_dir: Path, run_id: str, how: str, at: int) -> dict[str, Any]:
    """wandb.init's arguments: directory, names, the run to start (``how``: see :func:`choose_run`),
    offline without credentials, and bounded waits."""
    import wandb

    wandb_dir = Path(cfg.wandb_dir) if cfg.wandb_dir else run_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {}
    # login_timeout bounds the API key prompt wandb shows on a terminal when online is forced without one.
    for key, seconds in (
        ("init_timeout", INIT_TIMEOUT),
        ("login_timeout", INIT_TIMEOUT),
        ("finish_timeout", FINISH_TIMEOUT),
    ):
        if f"WANDB_{key.upper()}" not in os.environ:
            settings[key] = seconds
    kwargs: dict[str, Any] = {
        "dir": str(wandb_dir),
        "entity": cfg.wandb_entity,
        "name": cfg.wandb_run_name,
        "group": cfg.wandb_group or default_group(run_dir),
        "tags": list(cfg.wandb_tags),
    }
    if how == "rewind":  # the run had gone past this step: cut it back, then go on
        kwargs["resume_from"] = f"{run_id}?_step={at}"
    elif agent_run_id() is None:  # under an agent wandb takes WANDB_RUN_ID itself (and warns about an id)
        kwargs["id"] = run_id
        if how == "resume":
            kwargs["resume"] = "allow"
    if not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_DISABLED")) and not has_wandb_credentials():
        kwargs["mode"] = "offline"
        settings["silent"] = True  # the line below says it all, once
        log.info(
            "wandb: no credentials (WANDB_API_KEY or ~/.netrc), logging offline; upload later with: wandb sync %s",
            wandb_dir / "wandb" / "offline-run-*",
        )
    kwargs["settings"] = wandb.Settings(**settings)
    return kwargs


def can_fall_back_offline(kwargs: dict[str, Any]) -> bool:
    """Whether a wandb start that failed with ``kwargs`` may be retried offline: it was meant to be online."""
    mode = kwargs.get("mode") or os.environ.get("WANDB_MODE", "online")
    return mode in ("online", "run") and not os.environ.get("WANDB_DISABLED")


def offline_kwargs(kwargs: dict[str, Any], run_id: str) -> dict[str, Any]:
    """``kwargs`` for the same run logged offline: same id, nothing to resume or rewind on a server
    (wandb ignores both offline); ``wandb sync`` uploads it into that run later."""
    dropped = ("resume", "resume_from", "mode", "id")
    return {**{k: v for k, v in kwargs.items() if k not in dropped}, "id": run_id, "mode": "offline"}
