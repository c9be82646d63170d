"""``mnist-dist predict``, ``export`` and ``serve``: parse, call the inference library, print.

Only click is imported here: each command imports what it runs when it runs, so
``mnist-dist --help`` loads neither torch nor the web server. Errors a user can fix are
``UserError``s, which the command line turns into one ``Error:`` line.
"""

from __future__ import annotations

import logging
import sys

import click

from ..errors import ServeError
from .base import Command

EXIT_SOME_FAILED = 1
# Optional packages of `mnist-dist serve` (pip install "mnist-dist[serve]").
SERVE_PACKAGES = ("fastapi", "starlette", "uvicorn", "python_multipart", "anyio")
WEIGHTS_HELP = "model.safetensors of a run, or the run directory (checksum verified)."


@click.command("predict", cls=Command)
@click.option("--weights", required=True, type=click.Path(), help=WEIGHTS_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
@click.option("--top-k", type=click.IntRange(1, 10), default=None, help="Also show the K most probable digits.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
def predict_command(weights: str, as_json: bool, top_k: int | None, inputs: tuple[str, ...]) -> None:
    """Recognise the digit in each image file (PNG, JPEG, ...); directories are searched."""
    from ..inference.recognize import Recognizer
    from ..inference.results import report

    failed = report(Recognizer.load(weights).predict_files(inputs), as_json, top_k)
    if failed:
        sys.exit(EXIT_SOME_FAILED)


@click.command("export", cls=Command)
@click.option("--weights", required=True, type=click.Path(), help=WEIGHTS_HELP)
@click.option("--format", "fmt", type=click.Choice(["torchscript", "onnx"]), required=True, help="File format.")
@click.option("--output", type=click.Path(dir_okay=False), help="Where to write it [default: beside the weights].")
def export_command(weights: str, fmt: str, output: str | None) -> None:
    """Write the model as TorchScript or ONNX, checked to give the same logits as PyTorch."""
    from ..inference.export import export_model, verify_export

    path = export_model(weights, fmt, output)
    gap = verify_export(path, weights)
    click.echo(
        f"wrote {path} ({fmt}); input images (N, 28, 28) in [0, 1], output logits (N, 10); "
        f"largest logit difference from PyTorch: {gap:.2g}"
    )


def _serve_module():
    """``inference.serve``, imported only when serving; a missing web package is one ``Error:`` line."""
    try:
        from ..inference import serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVE_PACKAGES:
            raise
        raise ServeError(
            f"mnist-dist serve needs the package {exc.name!r}, not installed: "
            "pip install 'mnist-dist[serve]' (in a checkout: pip install -e '.[serve]')"
        ) from None
    return serve


@click.command("serve", cls=Command)
@click.option("--weights", required=True, type=click.Path(dir_okay=True), help=WEIGHTS_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all interfaces).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free port).")
@click.option(
    "--max-file-mb",
    type=click.FloatRange(0, min_open=True),
    default=5.0,
    show_default=True,
    help="Largest image file accepted, in MB.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Most images (files or arrays) in one request.",
)
@click.option(
    "--max-request-mb",
    type=click.FloatRange(0, min_open=True),
    default=32.0,
    show_default=True,
    help="Largest request body accepted, in MB.",
)
def serve_command(
    weights: str, host: str, port: int, max_file_mb: float, max_batch: int, max_request_mb: float
) -> None:
    """Serve a page to draw digits on, and an HTTP API: POST /predict, GET /healthz."""
    serve = _serve_module()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    limits = serve.Limits.in_megabytes(max_file_mb, max_batch, max_request_mb)
    serve.run_server(weights, host, port, limits)
