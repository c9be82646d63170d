"""What a ``POST /predict`` request holds, read within bounds: query options, image files, JSON pixels.

Every problem is an :class:`ApiError` with the HTTP status and a message naming it; a refused
body is still read (up to ``DRAIN_BYTES``) so that the client gets the answer instead of a
broken connection. :mod:`.serve` answers with what this reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

MB = 1024 * 1024
SIDE = 28
DRAIN_BYTES = 64 * MB  # a refused upload is read (and dropped) up to this much, so the client sees the answer


@dataclass(frozen=True)
class Limits:
    """Bounds on one request to ``POST /predict``."""

    max_file_bytes: int = 5 * MB
    max_batch: int = 64
    max_request_bytes: int = 32 * MB

    @classmethod
    def in_megabytes(cls, max_file_mb: float, max_batch: int, max_request_mb: float) -> Limits:
        """The limits as the command line gives them: sizes in MB."""
        return cls(round(max_file_mb * MB), max_batch, round(max_request_mb * MB))


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


async def bounded(request: Request, limit: int) -> Request:
    """``request`` whose body, when read, raises a 413 :class:`ApiError` past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        # A client waiting for "100 Continue" has sent nothing yet: it reads the answer at once.
        if "100-continue" not in request.headers.get("expect", "").lower():
            await drain(request)
        raise _too_large(limit)
    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            if message.get("more_body", False):
                await drain(request)
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


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than {limit / MB:g} MB (serve --max-request-mb)")


async def drain(request: Request) -> None:
    """Read and drop what is left of a refused request body, so that the client gets the answer."""
    dropped = 0
    while dropped < DRAIN_BYTES:
        message = await request.receive()
        dropped += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
