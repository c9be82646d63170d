"""Results as printed by predict and answered by serve: one JSON shape, an aligned table."""

import json

import torch

from mnist_dist.inference.images import ImageError
from mnist_dist.inference.recognize import FileResult, Prediction
from mnist_dist.inference.results import error_json, json_line, result_json, table

PROBABILITIES = (0.01, 0.02, 0.9, 0.03, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005)


def recognised(name: str) -> FileResult:
    return FileResult(name, prediction=Prediction(2, 0.9, PROBABILITIES), seen=torch.full((28, 28), 0.5))


def test_one_shape_for_predict_json_and_the_server():
    obj = result_json(recognised("a.png"), top_k=2, seen=True)
    assert set(obj) == {"file", "digit", "confidence", "probabilities", "top_k", "seen"}
    assert (obj["digit"], obj["confidence"], len(obj["probabilities"])) == (2, 0.9, 10)
    assert obj["top_k"] == [{"digit": 2, "probability": 0.9}, {"digit": 3, "probability": 0.03}]
    assert len(obj["seen"]) == 28 and obj["seen"][0][0] == 0.5
    assert json.loads(json_line(recognised("a.png"), None)) == result_json(recognised("a.png"))


def test_a_file_that_failed_is_its_reason():
    failed = FileResult("notes.png", error=ImageError("file is empty", "notes.png"))
    assert error_json(failed) == {"file": "notes.png", "error": "file is empty"}


def test_the_table_aligns_the_files_and_skips_the_failures():
    results = [
        recognised("a.png"),
        FileResult("bad.png", error=ImageError("file is empty")),
        recognised("folder/long-name.png"),
    ]
    lines = table(results, top_k=None).splitlines()
    assert lines[0].split() == ["file", "digit", "confidence"] and len(lines) == 3
    assert len(lines[1]) == len(lines[2])  # columns aligned: the short name is padded to the long one
    assert lines[2].split() == ["folder/long-name.png", "2", "90.0%"]
    assert table([recognised("a.png")], top_k=3).splitlines()[1].endswith("2: 90.0%  3: 3.0%  1: 2.0%")
