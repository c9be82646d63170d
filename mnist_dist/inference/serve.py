"""``mnist-dist serve``: a page to draw digits on, and an HTTP API, in one process.

- ``GET /``: the drawing page (``static/index.html``, self-contained: nothing from the network);
- ``POST /predict``: image files (``multipart/form-data``, any field name), or a JSON array
  of 784 pixel values (or 28 rows of 28), or a list of such arrays. Query options:
  ``top_k=K`` and ``seen=true`` (add the 28x28 image the model saw). The answer is
  ``{"results": [...]}``, one object per input, each as ``mnist-dist predict --json`` prints
  it; if an input cannot be used, the status is 422, ``error`` says why, and ``results``
  still holds every other input's answer (the bad one as ``{"file", "error"}``);
- ``GET /healthz``: the model, its test accuracy from the run's ``metrics.json`` if known,
  and the request limits.

Every bad request gets a 4xx answer ``{"error": "..."}`` naming the problem. Requests are
bounded (bytes per file, inputs per request, bytes per request, pixels per image) and at
most one recognition per CPU core runs at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from dataclasses import asdict, dataclass
from functools import partial
from importlib import resources
from typing import Any

import numpy as np
import python_multipart  # noqa: F401  (needed by form parsing: fail at start, not at the first upload)
import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse

from ..errors import ServeError
from ..runs import run_metrics
from .recognize import FileResult, Recognizer
from .results import error_json, result_json

log = logging.getLogger(__name__)

MB = 1024 * 1024
SIDE = 28
DRAIN_BYTES = 64 * MB  # a refused upload is read (and dropped) up to this much, so the client sees the answer
MAX_CONNECTIONS = 200  # beyond this many open connections and requests, uvicorn answers 503
ENDPOINTS = "GET /, POST /predict, GET /healthz"


@dataclass(frozen=True)
class Limits:
    """Bounds on one request to ``POST /predict``."""

    max_file_bytes: int = 5 * MB
    max_batch: int = 64
    max_request_bytes: int = 32 * MB


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def health(recognizer: Recognizer, weights: str | os.PathLike, limits: Limits) -> dict[str, Any]:
    """What ``GET /healthz`` answers: the model, its accuracy from the run's metrics if known, the limits."""
    path, metrics = run_metrics(weights)
    info: dict[str, Any] = {
        "status": "ok",
        "weights": str(weights),
        "hidden_sizes": list(recognizer.model.hidden_sizes),
        "test_accuracy": metrics.get("test_accuracy"),
        "metrics_file": None if path is None else str(path),
        "limits": asdict(limits),
    }
    if "val_accuracy" in metrics:  # a run evaluated on a validation split
        info["val_accuracy"] = metrics["val_accuracy"]
    return info


def create_app(recognizer: Recognizer, weights: str | os.PathLike, limits: Limits = Limits()) -> FastAPI:
    """The web application: the drawing page, ``POST /predict`` and ``GET /healthz`` over ``recognizer``."""
    page = resources.files(__package__).joinpath("static/index.html").read_text("utf-8")
    status = health(recognizer, weights, limits)
    slots = asyncio.Semaphore(os.cpu_count() or 1)
    # No /docs: FastAPI's documentation pages load their scripts from a CDN.
    app = FastAPI(title="mnist-dist", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return status

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            top_k, seen = query_options(request)
            kind = content_kind(request)
        except ApiError:
            await _drain(request)  # the body is unread: read it, so that the client gets the answer
            raise
        if kind == "multipart":
            work = partial(recognizer.predict_inputs, await read_uploads(request, limits))
        else:
            work = partial(recognise_json, recognizer, await read_body(request, limits.max_request_bytes), limits)
        async with slots:
            results = await run_in_threadpool(work)
        return answer(results, top_k, seen)

    add_error_handlers(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's (404, 405, ...), answered as ``{"error": "..."}``."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"not found: {request.url.path} (endpoints: {ENDPOINTS})"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path} (endpoints: {ENDPOINTS})"
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("error answering %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}: {exc})"}, status_code=500)


def query_options(request: Request) -> tuple[int | None, bool]:
    """``top_k`` (1-10) and ``seen`` (true/false) from the query string."""
    query = request.query_params
    top_k = None
    if "top_k" in query:
        value = query["top_k"]
        if not (value.isdigit() and 1 <= int(value) <= 10):
            raise ApiError(400, f"top_k must be an integer from 1 to 10, got {value!r}")
        top_k = int(value)
    flag = query.get("seen", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        raise ApiError(400, f"seen must be true or false, got {query['seen']!r}")
    return top_k, flag in ("true", "1")


def content_kind(request: Request) -> str:
    """``multipart`` or ``json``, from the Content-Type header; anything else is refused (415)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return "multipart"
    if ctype == "application/json" or ctype.endswith("+json"):
        return "json"
    raise ApiError(
        415,
        f"unsupported content type {ctype or '(none)'!r}: send image files as multipart/form-data "
        "(curl -F file=@digit.png URL/predict) or pixel values as application/json",
    )


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit / MB:g} MB (serve --max-request-mb)")


async def _drain(request: Request) -> None:
    """Read and drop what is left of a refused request body, so that the client gets the answer."""
    dropped = 0
    while dropped < DRAIN_BYTES:
        message = await request.receive()
        dropped += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def bounded(request: Request, limit: int) -> Request:
    """``request`` whose body, when read, raises a 413 :class:`ApiError` past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        # A client waiting for "100 Continue" has sent nothing yet: it reads the answer at once.
        if "100-continue" not in request.headers.get("expect", "").lower():
            await _drain(request)
        raise _too_large(limit)
    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            if message.get("more_body", False):
                await _drain(request)
            raise _too_large(limit)
        return message

    return Request(request.scope, receive)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes (else 413)."""
    return await (await bounded(request, limit)).body()


async def read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """The files of a multipart request as (file name, bytes), within ``limits`` (else 413, or 400 if malformed)."""
    try:
        limited = await bounded(request, limits.max_request_bytes)
        form = await limited.form(max_files=limits.max_batch, max_fields=limits.max_batch)
    except HTTPException as exc:  # starlette's MultiPartException, raised as a 400
        if "Too many files" in str(exc.detail):
            raise ApiError(413, f"too many files: at most {limits.max_batch} per request (serve --max-batch)") from None
        raise ApiError(400, f"malformed multipart/form-data request ({exc.detail})") from None
    try:
        uploads = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
        if not uploads:
            raise ApiError(
                422,
                "no files in the request: send images as multipart/form-data file fields "
                "(curl -F file=@digit.png URL/predict)",
            )
        inputs = []
        for n, (key, upload) in enumerate(uploads):
            name = upload.filename or f"{key}[{n}]"
            if (upload.size or 0) > limits.max_file_bytes:
                raise ApiError(
                    413,
                    f"{name}: file has {upload.size:,} bytes, more than the {limits.max_file_bytes:,} "
                    f"allowed per file ({limits.max_file_bytes / MB:g} MB; serve --max-file-mb)",
                )
            inputs.append((name, await upload.read()))
        return inputs
    finally:
        await form.close()


def json_inputs(body: bytes, max_batch: int) -> list[tuple[str, np.ndarray]]:
    """Images from a JSON body: 784 values, 28 rows of 28, or a list of either; named ``array[i]``."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(data, list):
        kind = {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
        raise ApiError(
            422, f"expected a JSON array of {SIDE * SIDE} pixel values (or a list of such arrays), got a JSON {kind}"
        )
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise ApiError(
            422, f"JSON arrays of different lengths: each image must be {SIDE * SIDE} values, or {SIDE} rows of {SIDE}"
        ) from None
    shape = arr.shape
    if shape in ((SIDE * SIDE,), (SIDE, SIDE)):
        arr = arr.reshape(1, SIDE, SIDE)
    elif (arr.ndim == 2 and shape[1] == SIDE * SIDE) or (arr.ndim == 3 and shape[1:] == (SIDE, SIDE)):
        arr = arr.reshape(-1, SIDE, SIDE)
    elif arr.ndim == 1:
        raise ApiError(422, f"JSON array has {shape[0]} values, expected {SIDE * SIDE} (one {SIDE}x{SIDE} image)")
    else:
        raise ApiError(
            422,
            f"JSON array of shape {list(shape)} is not one or more {SIDE}x{SIDE} images: send "
            f"{SIDE * SIDE} values (or {SIDE} rows of {SIDE}) per image",
        )
    if len(arr) > max_batch:
        raise ApiError(413, f"too many images: {len(arr)}, at most {max_batch} per request (serve --max-batch)")
    return [(f"array[{i}]", image) for i, image in enumerate(arr)]


def recognise_json(recognizer: Recognizer, body: bytes, limits: Limits) -> list[FileResult]:
    """The results for the images of a JSON body (see :func:`json_inputs`)."""
    return recognizer.predict_inputs(json_inputs(body, limits.max_batch))


def answer(results: list[FileResult], top_k: int | None, seen: bool) -> JSONResponse:
    """``{"results": [...]}`` (200), or with ``error`` too (422) when some input could not be recognised."""
    answers = [result_json(r, top_k, seen) if r.ok else error_json(r) for r in results]
    failed = [r for r in results if not r.ok]
    if not failed:
        return JSONResponse({"results": answers})
    first = failed[0].error
    error = (
        str(first)
        if len(results) == 1
        else (f"{len(failed)} of {len(results)} inputs could not be recognised; first: {first}")
    )
    return JSONResponse({"error": error, "results": answers}, status_code=422)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), or a :class:`ServeError` saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "choose another --port (0: any free port), or stop what uses it"
        ) from None
    return sock


def run_server(
    weights: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits()
) -> None:
    """Load the weights (a file or a run directory), listen, and serve until SIGINT/SIGTERM."""
    recognizer = Recognizer.load(weights)
    app = create_app(recognizer, weights, limits)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    accuracy = health(recognizer, weights, limits)["test_accuracy"]
    known = f" (test accuracy {100 * accuracy:.2f}%)" if isinstance(accuracy, (int, float)) else ""
    log.info("serving %s%s on http://%s:%d/ (Ctrl-C to stop)", weights, known, host, bound)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        limit_concurrency=MAX_CONNECTIONS,
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the
    # handlers it found: these let the command end normally (exit status 0) after that.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
