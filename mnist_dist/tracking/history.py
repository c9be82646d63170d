"""The run's own history file, ``history.jsonl``: reading it, and reading it as one run.

One JSON object a line: ``config`` (at every start), ``resume`` (a restart from a
checkpoint, at its step), ``step`` and ``epoch`` (metrics at an optimizer step), the final
``summary``, and ``artifact`` (the model artifact logged to wandb, by its weights' SHA-256).
A run that crashed after its last checkpoint logged steps it then does again: a ``resume``
record supersedes everything logged after its step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_history(path: Path) -> list[dict[str, Any]]:
    """The records of a history file; a last line cut short by a crash is ignored. Empty if there is no file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # written half-way when the process died
                break
            raise ValueError(f"{path} line {number} is not JSON") from None
    return records


def rewind(records: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The history as it stood at optimizer step ``step``: later records and any final summary dropped."""
    return [r for r in records if r.get("kind") != "summary" and r.get("step", 0) <= step]


def one_timeline(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A history with what every resume superseded removed: each ``resume`` record rewinds what came before it."""
    out: list[dict[str, Any]] = []
    for record in records:
        if record.get("kind") == "resume":
            out = rewind(out, record["step"])
        out.append(record)
    return out


def last_logged_step(records: list[dict[str, Any]]) -> int:
    """The highest step a history logged metrics at (wandb saw the same steps)."""
    return max((r["step"] for r in one_timeline(records) if r.get("kind") in ("step", "epoch")), default=0)
