"""Recognition results as people and programs read them: a table, JSON lines, JSON objects.

``mnist-dist predict`` prints them (stdout; a file that cannot be recognised gets one line
on stderr, ``FILE: what is wrong``), and ``mnist-dist serve`` answers with the same JSON,
whose JSON Schemas (``..._SCHEMA``) its OpenAPI description holds.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from .recognize import FileResult

_UNIT = {"type": "number", "minimum": 0, "maximum": 1}
_DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
RESULT_SCHEMA = {
    "type": "object",
    "description": "One recognised input, as `mnist-dist predict --json` prints it.",
    "required": ["file", "digit", "confidence", "probabilities"],
    "additionalProperties": False,
    "properties": {
        "file": {"type": "string", "description": "The upload's file name, or array[i]."},
        "digit": _DIGIT,
        "confidence": _UNIT,
        "probabilities": {"type": "array", "items": _UNIT, "minItems": 10, "maxItems": 10},
        "top_k": {
            "type": "array",
            "description": "With ?top_k=K: the K most probable digits, best first.",
            "items": {
                "type": "object",
                "required": ["digit", "probability"],
                "additionalProperties": False,
                "properties": {"digit": _DIGIT, "probability": _UNIT},
            },
        },
        "seen": {
            "type": "array",
            "description": "With ?seen=true: the 28x28 image the model saw, rows of values in [0, 1].",
            "items": {"type": "array", "items": _UNIT, "minItems": 28, "maxItems": 28},
            "minItems": 28,
            "maxItems": 28,
        },
    },
}
FAILED_SCHEMA = {
    "type": "object",
    "description": "An input that could not be recognised, and why.",
    "required": ["file", "error"],
    "additionalProperties": False,
    "properties": {"file": {"type": "string"}, "error": {"type": "string"}},
}
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
ANSWER_SCHEMA = {
    "type": "object",
    "required": ["results"],
    "properties": {"results": {"type": "array", "items": RESULT_SCHEMA}},
}
PARTIAL_ANSWER_SCHEMA = {  # the error, and each input's result or reason (none if the request itself is wrong)
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "results": {"type": "array", "items": {"anyOf": [RESULT_SCHEMA, FAILED_SCHEMA]}},
    },
}


def result_json(result: FileResult, top_k: int | None = None, seen: bool = False) -> dict:
    """One recognised file as a JSON object: file, digit, confidence, probabilities (index = digit).

    With ``top_k``, also the K most probable digits; with ``seen``, the 28x28 image the model
    saw (rows of values in [0, 1]). ``mnist-dist predict --json`` and ``serve`` both answer with it.
    """
    p = result.prediction
    obj = {
        "file": result.file,
        "digit": p.digit,
        "confidence": round(p.confidence, 6),
        "probabilities": [round(x, 6) for x in p.probabilities],
    }
    if top_k:
        obj["top_k"] = [{"digit": d, "probability": round(x, 6)} for d, x in p.top(top_k)]
    if seen:
        obj["seen"] = [[round(float(v), 3) for v in row] for row in result.seen]
    return obj


def error_json(result: FileResult) -> dict:
    """A file that could not be recognised, as a JSON object: file, error (the reason)."""
    return {"file": result.file, "error": result.error.reason}


def json_line(result: FileResult, top_k: int | None) -> str:
    """One recognised file as one line of JSON (see :func:`result_json`)."""
    return json.dumps(result_json(result, top_k))


def table(results: list[FileResult], top_k: int | None) -> str:
    """The recognised files as an aligned table: file, digit, confidence, and the top k if asked."""
    good = [r for r in results if r.ok]
    width = max([len("file")] + [len(r.file) for r in good])
    header = f"{'file':<{width}}  digit  confidence" + (f"  top {top_k}" if top_k else "")
    lines = [header]
    for r in good:
        p = r.prediction
        line = f"{r.file:<{width}}  {p.digit:>5}  {p.confidence:>10.1%}"
        if top_k:
            line += "  " + "  ".join(f"{d}: {x:.1%}" for d, x in p.top(top_k))
        lines.append(line)
    return "\n".join(lines)


def report(results: list[FileResult], as_json: bool, top_k: int | None) -> int:
    """Print results to stdout and one ``FILE: reason`` line per failure to stderr; return the failures."""
    if as_json:
        for r in results:
            if r.ok:
                click.echo(json_line(r, top_k))
    elif any(r.ok for r in results):
        click.echo(table(results, top_k))
    failed = [r for r in results if not r.ok]
    for r in failed:
        click.echo(str(r.error), err=True)
    if failed:
        click.echo(f"{len(failed)} of {len(results)} files could not be recognised", err=True)
    return len(failed)
