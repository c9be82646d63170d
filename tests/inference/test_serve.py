"""``mnist-dist serve``: a real server process on a free loopback port, called over HTTP.

Good files, batches and JSON arrays get the answers ``mnist-dist predict --json`` gives;
every kind of garbage gets a 4xx JSON error naming the problem, and the server keeps
answering after each.
"""

from __future__ import annotations

import io
import json
import re
import socket

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mnist_dist.cli import main
from mnist_dist.inference.preprocess import preprocess
from mnist_dist.inference.recognize import Recognizer

from serving import running_server

httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

MAX_FILE_MB, MAX_BATCH, MAX_REQUEST_MB = 0.2, 64, 2
OPTIONS = ["--max-file-mb", str(MAX_FILE_MB), "--max-batch", str(MAX_BATCH), "--max-request-mb", str(MAX_REQUEST_MB)]
PREDICT_KEYS = {"file", "digit", "confidence", "probabilities"}


# --- fixtures (trained_run_dir and mnist_test come from conftest.py) -----------------------


@pytest.fixture(scope="module")
def run_dir(trained_run_dir):
    return trained_run_dir


@pytest.fixture(scope="module")
def server(run_dir):
    with running_server(run_dir / "model.safetensors", *OPTIONS) as server:
        yield server
    assert server.process.returncode == 0, server.output
    assert "Traceback" not in server.output, server.output


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def recognizer(run_dir):
    return Recognizer.load(run_dir / "model.safetensors")


def on_paper(digit: np.ndarray, fmt: str = "PNG") -> bytes:
    """An MNIST digit as a picture: dark ink on light paper, enlarged 3x, off-centre."""
    amount = np.asarray(Image.fromarray(digit).resize((84, 84), Image.Resampling.BICUBIC), np.float64) / 255
    amount = np.pad(amount, ((10, 30), (40, 6)))
    buf = io.BytesIO()
    Image.fromarray((235 - 215 * amount).round().astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def assert_alive(server, client):
    assert server.alive, server.output
    assert client.get("/healthz").status_code == 200


# --- good requests -----------------------------------------------------------------------------


def test_healthz_reports_the_model_its_test_accuracy_and_the_limits(client, run_dir):
    info = client.get("/healthz").json()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert info["status"] == "ok" and info["hidden_sizes"] == [256]
    assert info["test_accuracy"] == metrics["test_accuracy"] and 0.9 < info["test_accuracy"] < 1
    assert info["metrics_file"] == str(run_dir / "metrics.json")
    assert info["limits"] == {
        "max_file_bytes": round(MAX_FILE_MB * 2**20),
        "max_batch": MAX_BATCH,
        "max_request_bytes": MAX_REQUEST_MB * 2**20,
    }


def test_the_page_is_served_and_loads_nothing_from_the_network(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert '<canvas id="pad"' in page and 'id="clear"' in page and 'id="seen"' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?(https?:)?//""", page)
    assert client.get("/docs").status_code == 404  # FastAPI's docs pages would load scripts from a CDN


def test_one_file_gets_exactly_the_answer_of_predict_json(client, run_dir, mnist_test, tmp_path):
    images, _ = mnist_test
    (tmp_path / "seven.png").write_bytes(on_paper(images[0].numpy()))
    response = client.post("/predict", files={"file": ("seven.png", (tmp_path / "seven.png").read_bytes())})
    assert response.status_code == 200, response.text
    (served,) = response.json()["results"]
    printed = CliRunner().invoke(
        main, ["predict", "--weights", str(run_dir / "model.safetensors"), "--json", str(tmp_path / "seven.png")]
    )
    expected = json.loads(printed.stdout)
    assert set(served) == PREDICT_KEYS and served["file"] == "seven.png"
    assert {**served, "file": None} == {**expected, "file": None}


def test_a_batch_of_64_files_is_answered_in_order(client, recognizer, mnist_test):
    images, _ = mnist_test
    files = [("file", (f"{i:02d}.png", on_paper(images[i].numpy()))) for i in range(MAX_BATCH)]
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["file"] for r in results] == [f"{i:02d}.png" for i in range(MAX_BATCH)]
    local = recognizer.predict_inputs([(name, data) for _, (name, data) in files])
    assert [r["digit"] for r in results] == [r.prediction.digit for r in local]


def test_json_arrays_of_784_values_rows_and_batches(client, recognizer, mnist_test):
    images, _ = mnist_test
    ints = images[:3].numpy()
    expected = [p.digit for p in recognizer.predict_batch(list(ints))]
    cases = {
        "one flat array of integers": (ints[0].reshape(-1).tolist(), expected[:1]),
        "28 rows of 28": (ints[1].tolist(), expected[1:2]),
        "a batch of flat float arrays": ((ints / 255).reshape(3, -1).tolist(), expected),
    }
    for name, (body, digits) in cases.items():
        response = client.post("/predict", json=body)
        assert response.status_code == 200, (name, response.text)
        results = response.json()["results"]
        assert [r["digit"] for r in results] == digits, name
        assert [r["file"] for r in results] == [f"array[{i}]" for i in range(len(digits))]


def test_top_k_and_the_image_the_model_saw(client, mnist_test):
    data = on_paper(mnist_test[0][5].numpy())
    response = client.post("/predict", params={"top_k": 3, "seen": "true"}, files={"f": ("d.png", data)})
    (result,) = response.json()["results"]
    assert [t["digit"] for t in result["top_k"]][0] == result["digit"] and len(result["top_k"]) == 3
    seen = torch.tensor(result["seen"])
    assert seen.shape == (28, 28) and torch.allclose(seen, preprocess(data), atol=6e-4)


def test_a_bad_file_in_a_batch_keeps_the_answers_of_the_others(client, mnist_test):
    good = on_paper(mnist_test[0][1].numpy())
    files = [("file", ("a.png", good)), ("file", ("notes.png", b"shopping list")), ("file", ("b.png", good))]
    response = client.post("/predict", files=files)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == (
        "1 of 3 inputs could not be recognised; first: "
        "notes.png: not an image Pillow can read (cannot identify image file)"
    )
    a, bad, b = body["results"]
    assert set(a) == PREDICT_KEYS and a == {**b, "file": "a.png"}
    assert bad == {"file": "notes.png", "error": "not an image Pillow can read (cannot identify image file)"}


# --- garbage: a 4xx JSON answer naming the problem, and the server still answering ------------------


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _chunks(total: int):
    for _ in range(total // 65536):
        yield b"0" * 65536


GARBAGE = {
    "not an image": (
        dict(files={"file": ("cat.png", b"\x89PNG but not really")}),
        422,
        "cat.png: not an image Pillow can read",
    ),
    "empty file": (dict(files={"file": ("empty.png", b"")}), 422, "empty.png: file is empty"),
    "truncated png": (
        lambda: dict(files={"file": ("cut.png", _png(Image.new("L", (300, 300), 90))[:120])}),
        422,
        "cut.png: image data is truncated or corrupt",
    ),
    "blank image": (
        lambda: dict(files={"file": ("white.png", _png(Image.new("L", (64, 64), 255)))}),
        422,
        "white.png: no ink found (blank image)",
    ),
    "decompression bomb": (
        lambda: dict(files={"file": ("bomb.png", _png(Image.new("1", (8200, 8200))))}),
        422,
        "bomb.png: image is too large (8200x8200 pixels, at most 64 megapixels)",
    ),
    "file over the size limit": (
        dict(files={"file": ("big.png", b"\0" * int(MAX_FILE_MB * 2**20 + 1))}),
        413,
        "big.png: file has 209,716 bytes, more than the 209,715 allowed per file (0.2 MB",
    ),
    "a flood of files": (
        dict(files=[("file", (f"{i}.png", b"x")) for i in range(MAX_BATCH + 1)]),
        413,
        f"too many files: at most {MAX_BATCH} per request",
    ),
    "body over the request limit": (
        dict(content=b"[" + b"0," * (MAX_REQUEST_MB * 2**20) + b"0]", headers={"content-type": "application/json"}),
        413,
        f"request body is larger than {MAX_REQUEST_MB} MB",
    ),
    "multipart body over the request limit": (
        dict(files={"file": ("huge.png", b"\0" * (MAX_REQUEST_MB * 2**20))}),
        413,
        f"request body is larger than {MAX_REQUEST_MB} MB",
    ),
    "body over the limit, chunked": (
        lambda: dict(content=_chunks(MAX_REQUEST_MB * 2**20 + 65536), headers={"content-type": "application/json"}),
        413,
        f"request body is larger than {MAX_REQUEST_MB} MB",
    ),
    "no files in the form": (dict(data={"note": "hello"}, files={}), 415, "unsupported content type"),
    "form fields but no files": (dict(files={"note": (None, "hello")}), 422, "no files in the request"),
    "malformed multipart": (
        dict(content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data"}),
        400,
        "malformed multipart/form-data request (Missing boundary in multipart.)",
    ),
    "wrong content type": (
        dict(content=b"7", headers={"content-type": "text/plain"}),
        415,
        "unsupported content type 'text/plain'",
    ),
    "wrong content type, large body": (
        dict(content=b"7" * (MAX_REQUEST_MB * 2**20 // 2), headers={"content-type": "text/plain"}),
        415,
        "unsupported content type",
    ),
    "no content type": (dict(content=b"7"), 415, "unsupported content type '(none)'"),
    "invalid json": (
        dict(content=b"[1, 2,", headers={"content-type": "application/json"}),
        400,
        "request body is not valid JSON",
    ),
    "deeply nested json": (
        dict(content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}),
        400,
        "request body is not valid JSON (maximum recursion depth exceeded",
    ),
    "a json object": (
        dict(json={"pixels": [0] * 784}),
        422,
        "expected a JSON array of 784 pixel values (or a list of such arrays), got a JSON object",
    ),
    "a json number": (dict(json=7), 422, "got a JSON number"),
    "783 values": (dict(json=[0] * 783), 422, "JSON array has 783 values, expected 784"),
    "rows of the wrong length": (dict(json=[[0] * 27] * 28), 422, "JSON array of shape [28, 27] is not"),
    "ragged batch": (dict(json=[[0] * 784, [0] * 10]), 422, "JSON arrays of different lengths"),
    "an empty array": (dict(json=[]), 422, "JSON array has 0 values, expected 784"),
    "too many arrays": (dict(json=[[0] * 784] * (MAX_BATCH + 1)), 413, f"too many images: {MAX_BATCH + 1}, at most"),
    "integers over 255": (dict(json=[300] * 784), 422, "array[0]: integer array values must be 0-255, found 300..300"),
    "negative integers": (dict(json=[-1] + [0] * 783), 422, "integer array values must be 0-255, found -1..0"),
    "floats over 1": (dict(json=[2.5] + [0.0] * 783), 422, "float array values must be in [0, 1], found 0..2.5"),
    "NaN": (
        dict(content=b"[NaN" + b", 0" * 783 + b"]", headers={"content-type": "application/json"}),
        422,
        "array holds NaN or infinite values",
    ),
    "booleans": (dict(json=[True] * 784), 422, "array of dtype bool is not an image"),
    "strings": (dict(json=["a"] * 784), 422, "array of dtype <U1 is not an image"),
    "nulls": (dict(json=[None] * 784), 422, "array of dtype object is not an image"),
    "bad top_k": (dict(params={"top_k": "11"}, json=[0] * 784), 400, "top_k must be an integer from 1 to 10, got '11'"),
    "bad seen": (dict(params={"seen": "maybe"}, json=[0] * 784), 400, "seen must be true or false"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_gets_a_4xx_json_error_naming_the_problem(server, client, case):
    request, status, message = GARBAGE[case]
    response = client.post("/predict", **(request() if callable(request) else request))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert_alive(server, client)


def test_unknown_paths_and_methods_get_json_errors(server, client):
    missing = client.get("/nothing-here")
    assert missing.status_code == 404 and "not found: /nothing-here" in missing.json()["error"]
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and wrong.json()["error"].startswith("method GET is not allowed on /predict")
    assert_alive(server, client)


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server):
    """A client that waits for "100 Continue" is answered at once and sends nothing."""
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = b""
        while b"}" not in answer:  # the JSON body's end
            chunk = conn.recv(65536)
            assert chunk, f"connection closed after {answer!r}"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"request body is larger than 2 MB" in answer


# --- the command ----------------------------------------------------------------------------------


def test_a_run_directory_serves_its_weights_and_metrics(run_dir):
    with running_server(run_dir) as server:
        info = server.health()
    assert info["weights"] == str(run_dir) and info["metrics_file"] == str(run_dir / "metrics.json")
    assert info["test_accuracy"] == json.loads((run_dir / "metrics.json").read_text())["test_accuracy"]


def test_weights_changed_since_training_are_refused(run_dir, tmp_path):
    import shutil

    from conftest import run_cli

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(data))
    for weights in (copy, copy / "model.safetensors"):
        # A subprocess with a time limit: were the weights accepted, the server would run on.
        proc = run_cli(["mnist_dist.cli", "serve", "--weights", str(weights), "--port", "0"], timeout=60)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "does not match the SHA-256 its run recorded" in proc.stderr
