"""The history file read as one run: a resume supersedes what a crashed attempt logged after its step."""

import pytest


def test_a_resumed_history_keeps_one_record_per_step():
    from mnist_dist.tracking.history import one_timeline, rewind

    first = [
        {"kind": "config"},
        *({"kind": "step", "step": s} for s in (10, 20, 30, 40)),
        {"kind": "epoch", "step": 40},
        {"kind": "step", "step": 50},
    ]  # crashed after step 50
    again = [
        {"kind": "resume", "step": 20},
        {"kind": "config"},
        {"kind": "step", "step": 30},
        {"kind": "step", "step": 40},
        {"kind": "epoch", "step": 40},
        {"kind": "summary", "step": 40},
    ]
    assert rewind(first, 20) == first[:3]
    timeline = one_timeline(first + again)
    assert [(r["kind"], r.get("step")) for r in timeline] == [
        ("config", None),
        ("step", 10),
        ("step", 20),
        ("resume", 20),
        ("config", None),
        ("step", 30),
        ("step", 40),
        ("epoch", 40),
        ("summary", 40),
    ]


def test_history_cut_short_by_a_crash_is_read(tmp_path):
    from mnist_dist.tracking.history import read_history

    path = tmp_path / "history.jsonl"
    path.write_text('{"kind": "config"}\n{"kind": "step", "step": 7}\n{"kind": "st')
    assert read_history(path) == [{"kind": "config"}, {"kind": "step", "step": 7}]
    path.write_text('{"kind": "config"}\nnot json\n{"kind": "step", "step": 7}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_history(path)
