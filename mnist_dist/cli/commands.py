"""The commands of a run: ``train``, ``eval`` and ``doctor`` (launched on every process, with
the config's options), and ``data download``, ``checkpoints verify``, ``report``,
``rendezvous``. Each parses, builds the config and calls one library function, imported
when the command runs: ``mnist-dist --help`` loads no torch.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ..config import FIELDS, build_config
from ..errors import RendezvousError
from .base import Command, config_options


@click.command("train", cls=Command)
@config_options
def train_command(config_path: str | None, **overrides: Any) -> None:
    """Train the MLP and evaluate it after every epoch; write the run directory."""
    from ..training.job import run

    run(build_config(config_path, overrides))


@click.command("eval", cls=Command)
@click.option(
    "--weights",
    required=True,
    type=click.Path(),
    help="model.safetensors to evaluate, or a run directory (its weights, checksum verified).",
)
@click.option("--output", type=click.Path(dir_okay=False), help="Write metrics (with confusion matrix) as JSON here.")
@config_options
def eval_command(weights: str, output: str | None, config_path: str | None, **overrides: Any) -> None:
    """Evaluate saved weights on the test split, exactly, on any number of processes."""
    from ..training.eval_job import run

    run(build_config(config_path, overrides), weights, output)


@click.command("doctor", cls=Command)
@click.option(
    "--report", type=click.Path(dir_okay=False), help="Write the JSON report here (default: OUTPUT_DIR/doctor.json)."
)
@config_options
def doctor_command(report: str | None, config_path: str | None, **overrides: Any) -> None:
    """Check, before training, what would make it fail or hang: versions, devices, rendezvous,
    collectives, run directory, data, wandb. Launch it the way training is launched."""
    from ..preflight.doctor import run_doctor

    sys.exit(run_doctor(build_config(config_path, overrides), report))


@click.group("data")
def data_group() -> None:
    """Fetch and verify datasets."""


@data_group.command("download")
@click.option("--dataset", type=click.Choice(FIELDS["dataset"].metadata["choices"]), default="mnist", show_default=True)
@click.option("--data-dir", show_default="$MNIST_DATA_DIR if set, else data", help="Where DATASET/raw/ goes.")
@click.option("--replace-corrupt", is_flag=True, help="Replace files that fail verification (kept as *.corrupt).")
def download_command(dataset: str, data_dir: str | None, replace_corrupt: bool) -> None:
    """Fetch DATASET into DATA_DIR and verify every file (size and md5)."""
    from ..config import default_data_dir
    from ..data.sources import ensure_dataset

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raw = ensure_dataset(default_data_dir() if data_dir is None else data_dir, dataset, replace_corrupt)
    click.echo(f"{dataset}: all files verified in {raw}")


@click.group("checkpoints")
def checkpoints_group() -> None:
    """Inspect a run's checkpoints."""


@checkpoints_group.command("verify")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def verify_command(run_dir: str) -> None:
    """Check every checkpoint and the final weights of RUN_DIR against their checksums.

    Exit status 1 if RUN_DIR holds no run, or the newest checkpoint or the final weights cannot be used.
    """
    from pathlib import Path

    from ..errors import RunDirError
    from ..runs import WEIGHTS_FILE, is_run_dir
    from ..training.resume import verify_run

    if not (is_run_dir(Path(run_dir)) or (Path(run_dir) / WEIGHTS_FILE).is_file()):
        raise RunDirError(
            f"{run_dir} holds no run (no checkpoints/, {WEIGHTS_FILE}, metrics.json, config.yaml or history.jsonl); "
            "pass the --output-dir of a training run"
        )
    lines, ok = verify_run(Path(run_dir))
    for line in lines:
        click.echo(line)
    if not ok:
        sys.exit(1)


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
def report_command(run_dir: str) -> None:
    """Draw a finished run's pictures into RUN_DIR: curves, confusion matrix, misclassified digits."""
    from ..tracking.report import write_report

    for path in write_report(run_dir):
        click.echo(f"wrote {path}")


@click.command("rendezvous", cls=Command)
@click.option("--nodes", type=click.IntRange(min=1), required=True, help="Number of nodes of the job.")
@click.option("--node-rank", type=click.IntRange(min=0), required=True, help="This node's rank (0: the main node).")
@click.option("--main-addr", required=True, help="Address of node 0 (where the main process runs).")
@click.option("--main-port", type=click.IntRange(1, 65535), required=True, help="Port the launcher will use.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="Seconds to wait for all nodes.",
)
def rendezvous_command(nodes: int, node_rank: int, main_addr: str, main_port: int, timeout: float) -> None:
    """Wait until every node of a job is up, before the launcher starts (used by launch/)."""
    import time

    from ..distributed.rendezvous import wait_for_nodes

    if node_rank >= nodes:
        raise click.BadParameter(
            f"{node_rank} is not a node of {nodes}: node ranks are 0 to {nodes - 1}", param_hint="'--node-rank'"
        )
    try:
        seconds = wait_for_nodes(nodes, node_rank, main_addr, main_port, timeout)
    except RendezvousError as exc:
        click.echo(f"Error: {exc}", err=True)
        # SLURM stops forwarding a cancelled job step's output once its tasks have ended:
        # stay a moment, so that this line reaches the job's output.
        time.sleep(1)
        sys.exit(exc.exit_code)  # 1, or 128 + the signal that stopped the wait
    if node_rank == 0 and nodes > 1:
        click.echo(f"rendezvous: all {nodes} nodes are up ({main_addr}:{main_port}, {seconds:.1f} s)")
