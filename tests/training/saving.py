"""Helpers of the checkpoint tests (the ``saver`` fixture is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

# Every kind of file a one-process checkpoint holds.
FILE_KINDS = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "rank-0.json", "trainer_state.json"]


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
