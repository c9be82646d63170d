"""``mnist-dist serve``: a real server process on a free loopback port, called over HTTP.

Good files, batches and JSON arrays get the answers ``mnist-dist predict --json`` gives;
every kind of garbage gets a 4xx JSON error naming the problem, and the server keeps
answering after each.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import time
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fuzzing import bounded, broken_files, files_pillow_warns_about, fuzz, image_bytes
from PIL import Image

from mnist_dist.cli import main
from mnist_dist.inference.preprocess import preprocess
from mnist_dist.inference.recognize import Recognizer

from conftest import skip_or_fail
from serving import running_server, serving_in_thread

httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from mnist_dist.inference.serve import create_app  # noqa: E402
from mnist_dist.inference.uploads import Limits  # noqa: E402

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


@pytest.fixture(scope="module")
def app(recognizer, run_dir):
    """The application the server runs, with the test server's limits, called in this process."""
    limits = Limits.in_megabytes(MAX_FILE_MB, MAX_BATCH, MAX_REQUEST_MB)
    return create_app(recognizer, run_dir / "model.safetensors", limits)


@pytest.fixture(scope="module")
def local(app):
    """A client of ``app`` in this process (no socket): an error in the app is raised here, not hidden."""
    with TestClient(app) as client:
        yield client


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
        "body_timeout_s": 30.0,
        "max_uploads": 32,
        "max_image_pixels": 64_000_000,  # images.MAX_PIXELS: a client can check an image before sending it
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


def test_a_json_batch_mixing_integer_and_float_images_judges_each_alone(client, recognizer, mnist_test):
    images, _ = mnist_test
    ints, floats = images[0].numpy(), images[1].numpy() / 255
    response = client.post("/predict", json=[ints.reshape(-1).tolist(), floats.reshape(-1).tolist()])
    assert response.status_code == 200, response.text
    expected = [recognizer.predict(ints).digit, recognizer.predict(floats).digit]
    assert [r["digit"] for r in response.json()["results"]] == expected


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
    "multipart without a boundary": (
        dict(content=b"--x\r\nnonsense", headers={"content-type": "multipart/form-data"}),
        400,
        "malformed multipart/form-data request: the Content-Type header has no boundary",
    ),
    "multipart not starting with its boundary": (
        dict(content=b"garbage", headers={"content-type": "multipart/form-data; boundary=xx"}),
        400,
        "malformed multipart/form-data request: the body does not start with the boundary line '--xx'",
    ),
    "multipart with a broken second part": (
        dict(
            content=b'--xx\r\nContent-Disposition: form-data; name="a"; filename="a.png"\r\n\r\nab\r\n'
            b"--xx\r\nContent-Disposition form-data\r\n\r\ncd\r\n--xx--\r\n",
            headers={"content-type": "multipart/form-data; boundary=xx"},
        ),
        400,
        "malformed multipart/form-data request: part 2 (byte ",
    ),
    "multipart cut short": (
        dict(
            content=b'--xx\r\nContent-Disposition: form-data; name="a"; filename="a.png"\r\n\r\nab',
            headers={"content-type": "multipart/form-data; boundary=xx"},
        ),
        400,
        "the body ends before the closing boundary line '--xx--' (was the upload cut short?)",
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
    "top_k a superscript two": (  # str.isdigit() says yes, int() says no: it was a 500
        dict(params={"top_k": "²"}, json=[0] * 784),
        400,
        "top_k must be an integer from 1 to 10, got '²'",
    ),
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
    # The answer says it all: the log has no line about it (python-multipart's own warnings included).
    assert not [line for line in server.lines if "boundary" in line or "header" in line], server.output


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


# --- clients that stall or vanish --------------------------------------------------------------


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].rstrip("/").split(":")
    return host, int(port)


def _wait_for_lines(server, count: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(server.lines) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.lines[count - 1 :]


def test_a_client_that_disconnects_mid_upload_is_one_quiet_log_line(server, client):
    before = len(server.lines)
    with socket.create_connection(_address(server.url), timeout=10) as conn:
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
            b"Content-Length: 100000\r\n\r\n"
            b'--xx\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n\r\nab'
        )
        time.sleep(0.2)
    (line,) = _wait_for_lines(server, before + 1)
    assert line.endswith("POST /predict: the client disconnected before sending the whole request body"), line
    time.sleep(0.5)  # nothing more comes (before the fix: two ClientDisconnect tracebacks)
    assert server.lines[before:] == [line]
    assert_alive(server, client)


def _stalled_upload(address: tuple[str, int], declared: int) -> socket.socket:
    """A connection that announces ``declared`` bytes of body, sends three, and then nothing."""
    conn = socket.create_connection(address, timeout=15)
    conn.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {declared}\r\n\r\n[0,".encode()
    )
    return conn


def _answer_then_close(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout if it never does)."""
    answer = b""
    with conn:
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_stalled_uploads_are_cut_off_and_cannot_hold_every_worker(recognizer, run_dir, mnist_test, caplog):
    """40 clients announce a body and stall (a slow-client attack): 8 hold the upload slots until the
    read timeout answers them 408, the other 32 get 503 at once, every connection is closed, and
    meanwhile and after the server answers others."""
    limits = Limits(body_timeout_s=1.5, max_uploads=8)
    app = create_app(recognizer, run_dir / "model.safetensors", limits)
    with caplog.at_level(logging.INFO), serving_in_thread(app) as url:
        started = time.monotonic()
        stalled = [_stalled_upload(_address(url), declared) for declared in (999_999_999, 100) * 20]
        assert httpx.get(url + "healthz", timeout=5).status_code == 200
        answers = [_answer_then_close(conn) for conn in stalled]
        took = time.monotonic() - started
        good = httpx.post(url + "predict", files={"f": ("d.png", on_paper(mnist_test[0][0].numpy()))}, timeout=10)
    statuses = Counter(answer.split(b" ", 2)[1] for answer in answers)
    assert statuses == {b"408": 8, b"503": 32}, answers
    assert b"request body not received in full within 1.5 s" in next(a for a in answers if b" 408 " in a)
    assert b"uploads are being received" in next(a for a in answers if b" 503 " in a)
    assert 1.5 <= took < 6, took
    assert good.status_code == 200, good.text
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info], caplog.text


# --- fuzzing: no 5xx, answers as the schema says, one line per bad file ---------------------------------


def test_healthz_and_the_openapi_schema_state_the_limits(local):
    assert local.get("/healthz").json()["limits"]["max_image_pixels"] == 64_000_000
    schema = local.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"200", "400", "408", "413", "415", "422", "503"} <= set(predict["responses"])
    assert "64 megapixels" in predict["description"]


def _schemathesis():
    """schemathesis and the checks the fuzz tests make: no 5xx; status, content type and body as documented."""
    try:
        import schemathesis
        from schemathesis.checks import not_a_server_error
        from schemathesis.specs.openapi.checks import (
            content_type_conformance,
            response_schema_conformance,
            status_code_conformance,
        )
    except ModuleNotFoundError as exc:
        skip_or_fail(f"{exc.name} is not installed (pip install -e '.[test]')")
    return schemathesis, [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]


def test_good_answers_match_the_openapi_schema(app, mnist_test):
    schemathesis, checks = _schemathesis()
    predict = schemathesis.openapi.from_asgi("/openapi.json", app)["/predict"]["POST"]
    digits = mnist_test[0][:2].numpy()
    for case in (
        predict.Case(body=digits.reshape(2, -1).tolist(), media_type="application/json", query={"top_k": 3}),
        predict.Case(body={"file": on_paper(digits[0])}, media_type="multipart/form-data", query={"seen": "true"}),
    ):
        assert case.call_and_validate(checks=checks).status_code == 200


@pytest.mark.parametrize(
    "operation,mode",
    [("GET /", "positive"), ("GET /healthz", "positive"), ("POST /predict", "positive"), ("POST /predict", "negative")],
)
def test_fuzz_the_api_from_its_openapi_schema(app, operation, mode, caplog):
    """Schemathesis generates requests from /openapi.json (``FUZZ_EXAMPLES`` per operation and mode, seeded):
    valid ones (positive) and ones the schema forbids (negative: bad query values, bodies of the wrong
    shape or type). No answer is a 5xx, and each has a status, content type and body the schema documents."""
    schemathesis, checks = _schemathesis()
    method, path = operation.split()
    strategy = schemathesis.openapi.from_asgi("/openapi.json", app)[path][method].as_strategy(
        generation_mode=schemathesis.GenerationMode(mode)
    )

    @fuzz
    @given(case=strategy)
    def answers_as_documented(case):
        bounded(lambda: case.call_and_validate(checks=checks))

    with caplog.at_level(logging.INFO):
        answers_as_documented()
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info], caplog.text


def test_fuzz_predict_with_broken_image_files(local, caplog):
    """Truncated, bit-flipped and random bytes as uploads: a 200, or a 422 naming the file and what is
    wrong in one line; never a 5xx or a traceback, each request bounded in time."""

    @fuzz
    @given(data=image_bytes(), name=st.sampled_from(["digit.png", "photo.jpg", "scan"]))
    def one_line_per_bad_file(data, name):
        response = bounded(lambda: local.post("/predict", files={"file": (name, data)}))
        assert response.status_code in (200, 422), response.text
        (result,) = response.json()["results"]
        if response.status_code == 200:
            assert set(result) == PREDICT_KEYS
        else:
            assert set(result) == {"file", "error"} and "\n" not in result["error"]
            assert response.json()["error"] == f"{name}: {result['error']}"

    with caplog.at_level(logging.INFO):
        one_line_per_bad_file()
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info], caplog.text


def test_a_batch_of_broken_files_to_the_real_server(server, client, mnist_test):
    files = [*broken_files(20), *files_pillow_warns_about(), ("good.png", on_paper(mnist_test[0][0].numpy()))]
    response = client.post("/predict", files=[("file", f) for f in files])
    assert response.status_code == 422, response.text
    results = response.json()["results"]
    assert [r["file"] for r in results] == [name for name, _ in files]
    assert all(set(r) in (PREDICT_KEYS, {"file", "error"}) for r in results) and set(results[-1]) == PREDICT_KEYS
    assert sum("error" in r for r in results) >= 10, results
    assert_alive(server, client)
    assert "Warning" not in server.output, server.output  # Pillow's, on stderr


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
