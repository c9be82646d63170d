"""``mnist-dist serve``: a page to draw digits on, and an HTTP API, in one process.

- ``GET /``: the drawing page (``static/index.html``, self-contained: nothing from the network);
- ``POST /predict``: image files (``multipart/form-data``, any field name), or a JSON array
  of 784 pixel values (or 28 rows of 28), or a list of such arrays. Query options:
  ``top_k=K`` and ``seen=true`` (add the 28x28 image the model saw). The answer is
  ``{"results": [...]}``, one object per input, each as ``mnist-dist predict --json`` prints
  it; if an input cannot be used, the status is 422, ``error`` says why, and ``results``
  still holds every other input's answer (the bad one as ``{"file", "error"}``);
- ``GET /healthz``: the model, its test accuracy from the run's ``metrics.json`` if known,
  and the request limits (the largest image in pixels included);
- ``GET /openapi.json``: all of this as an OpenAPI schema (what the fuzz tests read).

Every bad request gets a 4xx answer ``{"error": "..."}`` naming the problem. Requests are
bounded (bytes per file, inputs per request, bytes per request, pixels per image, seconds
for the body to arrive, bodies received at once) and at most one recognition per CPU core
runs at a time. A client that goes away mid-request is one line in the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from importlib import resources
from typing import Any

import python_multipart  # noqa: F401  (needed by form parsing: fail at start, not at the first upload)
import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from ..errors import ServeError
from ..runs import run_metrics
from .images import MAX_PIXELS
from .recognize import FileResult, Recognizer
from .results import ANSWER_SCHEMA, ERROR_SCHEMA, PARTIAL_ANSWER_SCHEMA, error_json, result_json
from .uploads import (
    ApiError,
    Limits,
    content_kind,
    drain,
    json_inputs,
    query_options,
    read_body,
    read_uploads,
    request_schema,
    within,
)

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 200  # beyond this many open connections and requests, uvicorn answers 503
ENDPOINTS = "GET /, POST /predict, GET /healthz"
DEFAULT_LIMITS = Limits()


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


HEALTH_SCHEMA = {
    "type": "object",
    "required": ["status", "weights", "hidden_sizes", "test_accuracy", "metrics_file", "limits"],
    "properties": {
        "status": {"const": "ok"},
        "weights": {"type": "string"},
        "hidden_sizes": {"type": "array", "items": {"type": "integer"}},
        "test_accuracy": {"type": ["number", "null"]},
        "val_accuracy": {"type": "number"},
        "metrics_file": {"type": ["string", "null"]},
        "limits": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}
PREDICT_DOC = (
    "Recognise the digit in each image file (multipart/form-data, any field names) or JSON array "
    "(784 values or 28 rows of 28: integers 0-255 or floats in [0, 1]; or a list of such arrays). "
    f"Images over {MAX_PIXELS // 10**6} megapixels are refused; GET /healthz states every limit."
)
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _json("One result per input, in order.", ANSWER_SCHEMA),
    400: _json("Malformed JSON or multipart (the message names the part), or a bad query option.", ERROR_SCHEMA),
    408: _json("The body did not arrive in full within the read timeout; the connection is closed.", ERROR_SCHEMA),
    413: _json("Beyond a limit: bytes per file or per request, inputs per request.", ERROR_SCHEMA),
    415: _json("Neither multipart/form-data nor JSON.", ERROR_SCHEMA),
    422: _json("An input could not be recognised; `results` keeps the others' answers.", PARTIAL_ANSWER_SCHEMA),
    503: _json("Too many uploads are being received at once: try again in a few seconds.", ERROR_SCHEMA),
}


def health(recognizer: Recognizer, weights: str | os.PathLike, limits: Limits) -> dict[str, Any]:
    """What ``GET /healthz`` answers: the model, its accuracy from the run's metrics if known, the limits."""
    path, metrics = run_metrics(weights)
    info: dict[str, Any] = {
        "status": "ok",
        "weights": str(weights),
        "hidden_sizes": list(recognizer.model.hidden_sizes),
        "test_accuracy": metrics.get("test_accuracy"),
        "metrics_file": None if path is None else str(path),
        "limits": {**asdict(limits), "max_image_pixels": MAX_PIXELS},
    }
    if "val_accuracy" in metrics:  # a run evaluated on a validation split
        info["val_accuracy"] = metrics["val_accuracy"]
    return info


def create_app(recognizer: Recognizer, weights: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> FastAPI:
    """The web application: the drawing page, ``POST /predict`` and ``GET /healthz`` over ``recognizer``."""
    page = resources.files(__package__).joinpath("static/index.html").read_text("utf-8")
    status = health(recognizer, weights, limits)
    slots = asyncio.Semaphore(os.cpu_count() or 1)
    uploads = asyncio.Semaphore(limits.max_uploads)
    # python-multipart logs a warning for each malformed body: the 400 answer says it, and better.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    # No /docs: FastAPI's documentation pages load their scripts from a CDN. The schema is served.
    app = FastAPI(title="mnist-dist", docs_url=None, redoc_url=None, openapi_url="/openapi.json")

    @app.get("/", response_class=HTMLResponse, responses={200: {"description": "The drawing page."}})
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", responses={200: _json("The model and the limits.", HEALTH_SCHEMA)})
    async def healthz() -> dict[str, Any]:
        return status

    @app.post("/predict", description=PREDICT_DOC, openapi_extra=request_schema(limits), responses=PREDICT_RESPONSES)
    async def predict(request: Request) -> JSONResponse:
        if uploads.locked():
            message = f"{limits.max_uploads} uploads are being received: try again in a few seconds"
            raise ApiError(503, message, close=True)
        async with uploads:
            top_k, seen, work = await received(within(request, limits.body_timeout_s), recognizer, limits)
        async with slots:
            results = await run_in_threadpool(work)
        return answer(results, top_k, seen)

    add_error_handlers(app)
    return app


async def received(
    request: Request, recognizer: Recognizer, limits: Limits
) -> tuple[int | None, bool, Callable[[], list[FileResult]]]:
    """The query options of a ``POST /predict`` and its recognition, to run, on the inputs its body holds."""
    try:
        top_k, seen = query_options(request)
        kind = content_kind(request)
    except ApiError:
        await drain(request)  # the body is unread: read it, so that the client gets the answer
        raise
    if kind == "multipart":
        work = partial(recognizer.predict_inputs, await read_uploads(request, limits))
    else:
        work = partial(recognise_json, recognizer, await read_body(request, limits.max_request_bytes), limits)
    return top_k, seen, work


def add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's (404, 405, ...), answered as ``{"error": "..."}``."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Connection": "close"} if exc.close else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.info(
            "%s %s: the client disconnected before sending the whole request body", request.method, request.url.path
        )
        return Response(status_code=400)  # nobody reads it: the connection is gone

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


def server_config(app: FastAPI, **options: Any) -> uvicorn.Config:
    """How uvicorn serves ``app`` for ``mnist-dist serve``; ``options`` override (tests: ``log_config=None``)."""
    settings: dict[str, Any] = dict(
        log_level="warning",
        access_log=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
        limit_concurrency=MAX_CONNECTIONS,
    )
    return uvicorn.Config(app, **{**settings, **options})


def run_server(
    weights: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, limits: Limits = DEFAULT_LIMITS
) -> None:
    """Load the weights (a file or a run directory), listen, and serve until SIGINT/SIGTERM."""
    recognizer = Recognizer.load(weights)
    app = create_app(recognizer, weights, limits)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    accuracy = health(recognizer, weights, limits)["test_accuracy"]
    known = f" (test accuracy {100 * accuracy:.2f}%)" if isinstance(accuracy, (int, float)) else ""
    log.info("serving %s%s on http://%s:%d/ (Ctrl-C to stop)", weights, known, host, bound)
    config = server_config(app)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the
    # handlers it found: these let the command end normally (exit status 0) after that.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
