"""Reading wandb's offline run files back (wandb has no reader of its own for them)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path):
    """Decode a ``.wandb`` file: a ':W&B' header, then a LevelDB log of ``Record`` protobufs.

    The log is made of 32 KiB blocks; each chunk has a 7-byte header (checksum u32,
    length u16, type u8) and a record longer than a block's rest is split FIRST,
    MIDDLE..., LAST. A block's last < 7 bytes are padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, parts, records = HEADER, [], []
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, FIRST):
            parts = [chunk]
        elif kind in (MIDDLE, LAST):
            parts.append(chunk)
        else:  # zero padding at the end of a file
            continue
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
    return records


def wandb_history(records) -> list[tuple[int, dict]]:
    """(step, {key: value}) of each history row."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.append((r.history.step.num, items))
    return rows


def wandb_config(records) -> dict:
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.config.update})
    return config


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))
