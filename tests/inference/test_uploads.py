"""uploads: what a POST /predict request holds, read from real ASGI requests within bounds.

Each request is a starlette ``Request`` fed its body in chunks, as a server feeds it; multipart
bodies are encoded by httpx, as a client sends them. tests/inference/test_serve.py sends the
same kinds of garbage to a running server.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[test]')")

from starlette.requests import Request  # noqa: E402

from mnist_dist.inference.uploads import (  # noqa: E402
    ApiError,
    Limits,
    content_kind,
    json_inputs,
    query_options,
    read_body,
    read_uploads,
)


def request(body: bytes = b"", headers: dict[str, str] | None = None, query: str = "", chunk: int = 4096):
    """A POST /predict request whose body arrives in chunks; ``.received`` counts what was read of it."""
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": n < len(parts) - 1} for n, p in enumerate(parts)]

    async def receive() -> dict:
        if not messages:
            return {"type": "http.disconnect"}
        received.append(len(messages[0]["body"]))
        return messages.pop(0)

    received: list[int] = []
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "app": None,  # as in a served request: starlette then raises a malformed form as an HTTPException
    }
    req = Request(scope, receive)
    req.received = received  # type: ignore[attr-defined]
    return req


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    """The body and headers httpx sends for these files."""
    sent = httpx.Request("POST", "http://test/predict", files=[("file", (name, data)) for name, data in files])
    return sent.read(), dict(sent.headers)


def refused(coroutine_or_call) -> ApiError:
    with pytest.raises(ApiError) as info:
        if asyncio.iscoroutine(coroutine_or_call):
            asyncio.run(coroutine_or_call)
        else:
            coroutine_or_call()
    return info.value


def test_query_options():
    assert query_options(request(query="top_k=3&seen=true")) == (3, True)
    assert query_options(request()) == (None, False)
    for bad in ("top_k=0", "top_k=11", "top_k=abc", "top_k=-1"):
        error = refused(lambda bad=bad: query_options(request(query=bad)))
        assert (error.status, error.message.split(",")[0]) == (400, "top_k must be an integer from 1 to 10"), bad
    error = refused(lambda: query_options(request(query="seen=maybe")))
    assert (error.status, error.message) == (400, "seen must be true or false, got 'maybe'")


def test_content_kind():
    assert content_kind(request(headers={"Content-Type": "multipart/form-data; boundary=x"})) == "multipart"
    assert content_kind(request(headers={"Content-Type": "application/json"})) == "json"
    assert content_kind(request(headers={"Content-Type": "application/vnd.api+json"})) == "json"
    error = refused(lambda: content_kind(request(headers={"Content-Type": "text/plain"})))
    assert error.status == 415 and "unsupported content type 'text/plain'" in error.message
    assert "curl -F file=@digit.png" in error.message
    assert "'(none)'" in refused(lambda: content_kind(request())).message


def test_json_bodies_of_one_or_many_images():
    pixels = np.arange(784) % 256
    one = json_inputs(json.dumps(pixels.tolist()).encode(), max_batch=4)
    rows = json_inputs(json.dumps(pixels.reshape(28, 28).tolist()).encode(), max_batch=4)
    many = json_inputs(json.dumps([pixels.tolist()] * 3).encode(), max_batch=4)
    assert [name for name, _ in one] == ["array[0]"] and [name for name, _ in many] == [
        "array[0]",
        "array[1]",
        "array[2]",
    ]
    for _, image in [*one, *rows, *many]:
        assert image.shape == (28, 28) and np.array_equal(image.ravel(), pixels)


@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"[1, 2,", 400, "request body is not valid JSON"),
        (
            b'{"pixels": []}',
            422,
            "expected a JSON array of 784 pixel values (or a list of such arrays), got a JSON object",
        ),
        (b'"abc"', 422, "got a JSON string"),
        (json.dumps([0] * 783).encode(), 422, "JSON array has 783 values, expected 784 (one 28x28 image)"),
        (json.dumps([[0] * 784, [0] * 10]).encode(), 422, "JSON arrays of different lengths"),
        (json.dumps([[0] * 5] * 5).encode(), 422, "JSON array of shape [5, 5] is not one or more 28x28 images"),
        (json.dumps([[0] * 784] * 5).encode(), 413, "too many images: 5, at most 4 per request"),
    ],
    ids=["not-json", "object", "string", "783-values", "ragged", "5x5", "too-many"],
)
def test_json_bodies_that_are_not_images(body, status, message):
    error = refused(lambda: json_inputs(body, max_batch=4))
    assert error.status == status and message in error.message, error.message


def test_a_body_is_read_up_to_its_limit_and_no_further():
    assert asyncio.run(read_body(request(b"x" * 5000), limit=5000)) == b"x" * 5000
    # Sent in chunks, without a declared length: refused once past the limit, the rest read and dropped.
    req = request(b"x" * 50_000, chunk=1000)
    error = refused(read_body(req, limit=10_000))
    assert (error.status, error.message) == (413, "request body is larger than 0.00953674 MB (serve --max-request-mb)")
    assert sum(req.received) == 50_000
    # A declared length over the limit is refused before any of the body is used.
    declared = request(b"x" * 50_000, headers={"Content-Length": "50000", "Expect": "100-continue"})
    assert refused(read_body(declared, limit=10_000)).status == 413
    assert declared.received == []


def test_uploaded_files_are_read_with_their_names():
    body, headers = multipart([("a.png", b"first"), ("b.jpg", b"second")])
    assert asyncio.run(read_uploads(request(body, headers), Limits())) == [("a.png", b"first"), ("b.jpg", b"second")]


def test_uploads_beyond_the_limits_are_refused_naming_the_limit():
    limits = Limits(max_file_bytes=1000, max_batch=2, max_request_bytes=100_000)
    body, headers = multipart([("small.png", b"x" * 10), ("big.png", b"x" * 2000)])
    error = refused(read_uploads(request(body, headers), limits))
    assert error.status == 413 and error.message.startswith("big.png: file has 2,000 bytes, more than the 1,000")
    body, headers = multipart([(f"{n}.png", b"x") for n in range(3)])
    error = refused(read_uploads(request(body, headers), limits))
    assert (error.status, error.message) == (413, "too many files: at most 2 per request (serve --max-batch)")
    body, headers = multipart([])
    headers["content-type"] = "multipart/form-data; boundary=nothing"
    error = refused(read_uploads(request(b"--nothing--\r\n", headers), limits))
    assert error.status == 422 and error.message.startswith("no files in the request")


def test_megabytes_from_the_command_line():
    assert Limits.in_megabytes(0.5, 8, 2) == Limits(524288, 8, 2097152)
    assert Limits() == Limits.in_megabytes(5, 64, 32)
