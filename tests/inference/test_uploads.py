"""uploads: what a POST /predict request holds, read from real ASGI requests within bounds.

Each request is a starlette ``Request`` fed its body in chunks, as a server feeds it; multipart
bodies are encoded by httpx, as a client sends them. tests/inference/test_serve.py sends the
same kinds of garbage to a running server.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from fuzzing import bounded, fuzz
from hypothesis import given
from hypothesis import strategies as st

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
    within,
)


def request(
    body: bytes = b"", headers: dict[str, str] | None = None, query: str = "", chunk: int = 4096, stall: bool = False
):
    """A POST /predict request whose body arrives in chunks; ``.received`` counts what was read of it.

    With ``stall``, the client sends ``body`` and then nothing more, never ending it (a slow client).
    """
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [
        {"type": "http.request", "body": p, "more_body": stall or n < len(parts) - 1} for n, p in enumerate(parts)
    ]

    async def receive() -> dict:
        if not messages and stall:
            await asyncio.Event().wait()  # nothing more arrives
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
    assert query_options(request(query="top_k=003")) == (3, False)
    for bad in ("top_k=0", "top_k=11", "top_k=abc", "top_k=-1", "top_k=%C2%B2", "top_k=" + "1" * 5000):
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


def test_each_image_of_a_json_batch_is_judged_alone():
    """A 0-255 integer image beside a 0-1 float image: each keeps its own kind (a batch is not one array)."""
    ints, floats = [0] * 700 + [255] * 84, [0.0] * 700 + [1.0] * 84
    for body in ([ints, floats], [np.reshape(ints, (28, 28)).tolist(), np.reshape(floats, (28, 28)).tolist()]):
        (_, first), (_, second) = json_inputs(json.dumps(body).encode(), max_batch=4)
        assert (first.dtype.kind, first.max()) == ("i", 255) and (second.dtype.kind, second.max()) == ("f", 1.0)
    # One image mixing both is still one array: floats up to 255, refused when recognised.
    ((_, mixed),) = json_inputs(json.dumps(ints[:-1] + [0.5]).encode(), max_batch=4)
    assert mixed.dtype.kind == "f" and mixed.max() == 255


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


@pytest.mark.parametrize("declared", ["999999999", "100", None], ids=["oversized", "small", "chunked"])
def test_a_body_that_stops_arriving_is_refused_after_the_read_timeout(declared):
    """A slow client cannot hold the server: the whole body must arrive within the timeout (else 408)."""
    headers = {"Content-Type": "application/json", **({"Content-Length": declared} if declared else {})}
    started = time.monotonic()
    error = refused(read_body(within(request(b"[0, ", headers, stall=True), 0.3), limit=10_000))
    assert (error.status, error.message) == (408, "request body not received in full within 0.3 s")
    assert 0.3 <= time.monotonic() - started < 3
    body, headers = multipart([("a.png", b"x" * 5000)])
    error = refused(read_uploads(within(request(body[:3000], headers, stall=True), 0.3), Limits()))
    assert error.status == 408


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


GOOD = (
    b'--xx\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n\r\nabc\r\n'
    b'--xx\r\nContent-Disposition: form-data; name="g"; filename="b.png"\r\n\r\ndef\r\n--xx--\r\n'
)
MALFORMED = {
    "no boundary line first": (b"abcdef", "the body does not start with the boundary line '--xx' of the Content-Type"),
    "a bad header in part 2": (
        GOOD.replace(b'Disposition: form-data; name="g"', b'Disposition form-data; name="g"'),
        "part 2 (byte 98): found invalid character ' ' in header",
    ),
    "no name in part 2": (GOOD.replace(b'name="g"; ', b""), 'part 2: the Content-Disposition header field "name"'),
    "line ends without CR": (GOOD.replace(b"\r\n", b"\n"), "part 1 (byte 4): did not find CR at end of boundary"),
    "cut short": (GOOD[:90], "the body ends before the closing boundary line '--xx--' (was the upload cut short?)"),
    "headers never end": (GOOD[:70], "the body ends before the closing boundary line '--xx--'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_multipart_is_a_400_naming_the_part(case):
    body, message = MALFORMED[case]
    error = refused(read_uploads(request(body, {"Content-Type": "multipart/form-data; boundary=xx"}), Limits()))
    assert error.status == 400 and error.message.startswith("malformed multipart/form-data request: ")
    assert message in error.message, error.message


def test_multipart_without_a_boundary_says_so():
    error = refused(read_uploads(request(GOOD, {"Content-Type": "multipart/form-data"}), Limits()))
    assert (error.status, error.message) == (
        400,
        "malformed multipart/form-data request: the Content-Type header has no boundary "
        "(multipart/form-data; boundary=...)",
    )


@st.composite
def mangled_multipart(draw) -> bytes:
    """A good two-file multipart body with one to three bytes changed, cut, or a slice removed or repeated."""
    body = bytearray(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(body) - 1))
        kind = draw(st.sampled_from(["replace", "cut", "remove", "repeat"]))
        if kind == "replace":
            body[at] = draw(st.sampled_from(b'-\r\n:;= "x\x00\xff'))
        elif kind == "cut":
            del body[at:]
        elif kind == "remove":
            del body[at : at + draw(st.integers(1, 12))]
        else:
            body[at:at] = body[at : at + draw(st.integers(1, 12))]
        if not body:
            break
    return bytes(body)


def test_fuzz_mangled_multipart_bodies():
    """Any mangling of a good multipart body gives its files, or a 400/422 ApiError of one line; nothing else."""

    @fuzz
    @given(body=mangled_multipart())
    def files_or_one_line(body):
        req = request(body, {"Content-Type": "multipart/form-data; boundary=xx"}, chunk=17)
        try:
            files = bounded(lambda: asyncio.run(read_uploads(req, Limits())))
        except ApiError as error:
            assert error.status in (400, 422) and "\n" not in error.message, error.message
        else:
            assert 1 <= len(files) <= 2

    files_or_one_line()
