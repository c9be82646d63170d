"""Command line: parse, build the config, call one function. No logic lives here.

Every config key gets an option (``batch_size`` -> ``--batch-size``, booleans as
``--shuffle/--no-shuffle``), generated from ``Config`` so the two never drift apart. Each
command imports what it runs only when it runs: ``mnist-dist --help`` loads no torch.
Any ``UserError`` (``errors.py``) ends the command with one ``Error:`` line, no traceback.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from typing import Any, NoReturn

import click

from .config import FIELDS, build_config, field_type
from .distributed.restarts import end_the_job
from .errors import RendezvousError, Stopped, UserError
from .inference.commands import export_command, predict_command, serve_command

# Exit status after Ctrl-C (SIGINT), as a shell reports a process it ended: 128 + 2.
EXIT_INTERRUPTED = 128 + signal.SIGINT


class _OneLineErrors:
    """Report bad options and user errors as one ``Error:`` line (no usage block, no traceback)."""

    def main(self, *args, **kwargs):
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            result = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.UsageError as exc:
            hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort)
            click.echo("Aborted!", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except UserError as exc:
            if not exc.quiet:  # e.g. a rank that lost a peer: another rank says it
                click.echo(f"Error: {exc}", err=True)
            if exc.recurs:
                end_the_job("this error")  # under torchrun --max-restarts: restarting would not help
            sys.exit(exc.exit_code)
        except Stopped as exc:  # a checkpoint is saved and the main process said so
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)


def _dashes(token: str) -> str:
    return token.replace("_", "-")


class Command(_OneLineErrors, click.Command):
    """A command whose options may also be spelled with the config's own key names
    (``--weight_decay`` for ``--weight-decay``), as a wandb sweep passes its parameters."""

    def __init__(self, *args, **kwargs):
        kwargs["context_settings"] = {"token_normalize_func": _dashes, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)


class Group(_OneLineErrors, click.Group):
    pass


def _option_for(name: str):
    meta = FIELDS[name].metadata
    flag = "--" + name.replace("_", "-")
    kind = field_type(name)
    help_text = meta["help"]
    if kind is bool:
        return click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_text)
    if "choices" in meta:
        param_type: Any = click.Choice(meta["choices"])
    else:
        param_type = {int: click.INT, float: click.FLOAT, str: click.STRING, tuple: click.STRING}[kind]
    return click.option(flag, name, type=param_type, default=None, help=help_text)


def config_options(func):
    """Add ``--config FILE`` and one override option per config key to a click command."""
    for name in reversed(list(FIELDS)):
        func = _option_for(name)(func)
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        help="YAML file of config keys (defaults < file < options).",
    )(func)


@click.command("train", cls=Command)
@config_options
def train_command(config_path: str | None, **overrides: Any) -> None:
    """Train the MLP and evaluate it after every epoch; write the run directory."""
    from .training.job import run

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
    from .evaluation import run_evaluation

    run_evaluation(build_config(config_path, overrides), weights, output)


@click.command("doctor", cls=Command)
@click.option(
    "--report", type=click.Path(dir_okay=False), help="Write the JSON report here (default: OUTPUT_DIR/doctor.json)."
)
@config_options
def doctor_command(report: str | None, config_path: str | None, **overrides: Any) -> None:
    """Check, before training, what would make it fail or hang: versions, devices, rendezvous,
    collectives, run directory, data, wandb. Launch it the way training is launched."""
    from .preflight.doctor import run_doctor

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
    from .config import default_data_dir
    from .data.sources import ensure_dataset

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

    from .errors import RunDirError
    from .runs import WEIGHTS_FILE, is_run_dir
    from .training.integrity import verify_run

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
    from .tracking.report import write_report

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

    from .distributed.rendezvous import wait_for_nodes

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


@click.group(cls=Group)
@click.version_option(package_name="mnist-dist")
def main() -> None:
    """mnist-dist: train, evaluate and serve an MNIST MLP on 1..N processes with Accelerate."""


for command in (
    train_command,
    eval_command,
    data_group,
    checkpoints_group,
    report_command,
    doctor_command,
    rendezvous_command,
    predict_command,
    export_command,
    serve_command,
):
    main.add_command(command)


def run_as_process(command: click.Command, **kwargs: Any) -> NoReturn:
    """Run a command as the whole process (console script, ``python -m``) and exit without
    tearing the interpreter down.

    By then every file the command writes is written and closed (atomically, fsynced),
    wandb is finished and the process group ended. What normal exit would still do is
    free, one by one, the objects that torch, torch._dynamo and accelerate create at
    import: about a second on a 2-core machine, measured side by side (wall time 0.77x
    for import + exit), a sixth of a whole 10-epoch run. atexit handlers still run, and
    the output streams are flushed. In-process callers (tests, notebooks) call the
    command itself and are not affected.
    """
    try:
        command.main(**kwargs)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # Ctrl-C outside click's handling (e.g. while it starts)
        code = EXIT_INTERRUPTED
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry_point() -> NoReturn:
    """The ``mnist-dist`` console script."""
    run_as_process(main, prog_name="mnist-dist")


if __name__ == "__main__":
    entry_point()
