"""What a ``POST /predict`` request holds, read within bounds: query options, image files, JSON pixels.

Every problem is an :class:`ApiError` with the HTTP status and a message naming it; a refused
body is still read (up to ``DRAIN_BYTES``) so that the client gets the answer instead of a
broken connection. A body must arrive whole within ``Limits.body_timeout_s`` (:func:`within`),
so that a client that stalls cannot hold the server. :mod:`.serve` answers with what this reads.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

import numpy as np
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

MB = 1024 * 1024
SIDE = 28
DRAIN_BYTES = 64 * MB  # a refused upload is read (and dropped) up to this much, so the client sees the answer


@dataclass(frozen=True)
class Limits:
    """Bounds on one request to ``POST /predict``, and on the uploads received at once."""

    max_file_bytes: int = 5 * MB
    max_batch: int = 64
    max_request_bytes: int = 32 * MB
    body_timeout_s: float = 30.0
    """The whole body must arrive within this many seconds (32 MB at about 1 MB/s), else 408."""
    max_uploads: int = 32
    """Request bodies received at once; one more is refused (503), so stalled clients cannot take every worker."""

    @classmethod
    def in_megabytes(cls, max_file_mb: float, max_batch: int, max_request_mb: float) -> Limits:
        """The limits as the command line gives them: sizes in MB."""
        return cls(round(max_file_mb * MB), max_batch, round(max_request_mb * MB))


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and a message naming the problem.

    With ``close``, the connection is closed after the answer: what is left of the body is not read.
    """

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


def _array(items: dict, length: int) -> dict:
    return {"type": "array", "items": items, "minItems": length, "maxItems": length}


def _image_schemas() -> list[dict]:
    """JSON Schemas of one image: 784 values, or 28 rows of 28; integers 0-255, or floats in [0, 1]."""
    values = [{"type": "integer", "minimum": 0, "maximum": 255}, {"type": "number", "minimum": 0, "maximum": 1}]
    flat = {"anyOf": [_array(v, SIDE * SIDE) for v in values]}
    rows = {"anyOf": [_array(_array(v, SIDE), SIDE) for v in values]}
    return [flat, rows]


def request_schema(limits: Limits) -> dict:
    """The OpenAPI description of what ``POST /predict`` takes: query options and the two kinds of body."""
    images = _image_schemas()
    batches = [{"type": "array", "items": image, "minItems": 1, "maxItems": limits.max_batch} for image in images]
    files = {"type": "string", "format": "binary"}
    return {
        "parameters": [
            {
                "name": "top_k",
                "in": "query",
                "description": "Also answer the K most probable digits.",
                "schema": {"type": "integer", "minimum": 1, "maximum": 10},
            },
            {
                "name": "seen",
                "in": "query",
                "description": "Also answer the 28x28 image the model saw.",
                "schema": {"type": "boolean"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {  # any field names; `file` as in the examples (curl -F file=@digit.png)
                    "schema": {"type": "object", "properties": {"file": files}, "additionalProperties": files}
                },
                "application/json": {"schema": {"anyOf": images + batches}},
            },
        },
    }


def query_options(request: Request) -> tuple[int | None, bool]:
    """``top_k`` (1-10) and ``seen`` (true/false) from the query string."""
    query = request.query_params
    top_k = None
    if "top_k" in query:
        value = query["top_k"]
        if not re.fullmatch("0*([1-9]|10)", value):  # not isdigit() and int(): "²" is a digit, int() refuses it
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


def within(request: Request, seconds: float) -> Request:
    """``request`` whose body must arrive in full within ``seconds`` from now; reading it after that
    raises a 408 :class:`ApiError` that closes the connection (a client that stalls holds nothing)."""
    deadline = time.monotonic() + seconds

    async def receive() -> dict:
        try:
            return await asyncio.wait_for(request.receive(), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise ApiError(408, f"request body not received in full within {seconds:g} s", close=True) from None

    return Request(request.scope, receive)


async def bounded(request: Request, limit: int) -> Request:
    """``request`` whose body, when read, raises a 413 :class:`ApiError` past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
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
    limited = await bounded(request, limits.max_request_bytes)
    body = await limited.body()  # whole, so that a malformed part can be named (see multipart_problem)
    try:
        form = await limited.form(max_files=limits.max_batch, max_fields=limits.max_batch)
    except HTTPException as exc:  # starlette's MultiPartException, raised as a 400
        if "Too many files" in str(exc.detail):
            raise ApiError(413, f"too many files: at most {limits.max_batch} per request (serve --max-batch)") from None
        raise ApiError(400, f"malformed multipart/form-data request: {multipart_problem(request, body, exc)}") from None
    try:
        closing = b"--" + _boundary(request) + b"--"
        if closing not in body:  # the parser takes a body cut short for a whole one
            raise ApiError(
                400,
                f"malformed multipart/form-data request: the body ends before the closing boundary line "
                f"{closing.decode('latin-1')!r} (was the upload cut short?)",
            )
        return await _files(form, limits)
    finally:
        await form.close()


async def _files(form, limits: Limits) -> list[tuple[str, bytes]]:
    """The (file name, bytes) of each file field of a parsed form; 422 if none, 413 if one is too large."""
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


def _boundary(request: Request) -> bytes:
    """The multipart boundary of the Content-Type header, read as the form parser reads it (``b""``: none)."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    return params.get(b"boundary", b"")


def multipart_problem(request: Request, body: bytes, error: HTTPException) -> str:
    """What is malformed in a multipart ``body`` the parser refused, and in which part (1 = the first).

    The parser reads the whole body as one chunk, so the offset of its error is a position in ``body``.
    """
    delimiter = b"--" + _boundary(request)
    if delimiter == b"--":
        return "the Content-Type header has no boundary (multipart/form-data; boundary=...)"
    cause = _parser_error(error)
    offset = getattr(cause, "offset", None)
    if not body.startswith(delimiter):
        shown = delimiter.decode("latin-1")
        return f"the body does not start with the boundary line {shown!r} of the Content-Type header: {body[:16]!r}"
    if offset is None:  # the parser's callbacks refused a part's headers ("name" missing): find the part
        heads = _part_heads(body, delimiter)
        named = re.compile(rb"(?im)^content-disposition:[^\r\n]*;\s*name=")
        part = next((n for n, head in enumerate(heads, 1) if not named.search(head)), None)
        what = str(error.detail)
        return f"part {part}: {_lower(what)}" if part else _lower(what)
    return f"part {body.count(delimiter, 0, offset)} (byte {offset}): {_readable(str(cause))}"


def _parser_error(error: BaseException) -> BaseException | None:
    """python-multipart's own error behind starlette's 400, which knows the byte offset (``.offset``)."""
    while error is not None and not hasattr(error, "offset"):
        error = error.__cause__ or error.__context__
    return error


def _readable(message: str) -> str:
    """The parser's message without its offset, bytes shown as characters: ``found invalid character ' '``."""
    message = re.sub(r" (at (index )?[0-9]+|[(][0-9]+[)])$", "", message)
    byte = r"(character|got|found) ([0-9]{1,3})(?![0-9-])"  # not "found 0-length header"
    return _lower(re.sub(byte, lambda m: f"{m[1]} {chr(int(m[2]))!r}" if int(m[2]) < 256 else m[0], message))


def _lower(message: str) -> str:
    return message[:1].lower() + message[1:]


def _part_heads(body: bytes, delimiter: bytes) -> list[bytes]:
    """The header block of each part of a multipart body (up to its first empty line)."""
    return [part.split(b"\r\n\r\n", 1)[0] for part in body.split(delimiter)[1:] if not part.startswith(b"--")]


def json_inputs(body: bytes, max_batch: int) -> list[tuple[str, np.ndarray]]:
    """Images from a JSON body: 784 values, 28 rows of 28, or a list of either; named ``array[i]``.

    Each image of a list is its own array, judged alone: 0-255 integers beside 0-1 floats is fine.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(data, list):
        kind = {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
        raise ApiError(
            422, f"expected a JSON array of {SIDE * SIDE} pixel values (or a list of such arrays), got a JSON {kind}"
        )
    shape = _shape(data)
    if shape in ((SIDE * SIDE,), (SIDE, SIDE)):
        images = [np.asarray(data).reshape(SIDE, SIDE)]
    elif (len(shape) == 2 and shape[1] == SIDE * SIDE) or (len(shape) == 3 and shape[1:] == (SIDE, SIDE)):
        images = [np.asarray(item).reshape(SIDE, SIDE) for item in data]
    elif len(shape) == 1:
        raise ApiError(422, f"JSON array has {shape[0]} values, expected {SIDE * SIDE} (one {SIDE}x{SIDE} image)")
    else:
        raise ApiError(
            422,
            f"JSON array of shape {list(shape)} is not one or more {SIDE}x{SIDE} images: send "
            f"{SIDE * SIDE} values (or {SIDE} rows of {SIDE}) per image",
        )
    if len(images) > max_batch:
        raise ApiError(413, f"too many images: {len(images)}, at most {max_batch} per request (serve --max-batch)")
    return [(f"array[{i}]", image) for i, image in enumerate(images)]


def _shape(data: list) -> tuple[int, ...]:
    """The shape of nested JSON lists (a 422 :class:`ApiError` if they are ragged)."""
    try:
        return np.asarray(data).shape
    except (ValueError, TypeError):
        raise ApiError(
            422, f"JSON arrays of different lengths: each image must be {SIDE * SIDE} values, or {SIDE} rows of {SIDE}"
        ) from None


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
