"""The ``mnist-dist`` command line: every command in one place, each thin over the library.

``base.py`` holds the machinery (one-line errors, options from the config, running as the
whole process), ``commands.py`` the commands of a run, ``inference.py`` ``predict``,
``export`` and ``serve``. ``python -m mnist_dist.train`` (``evaluate``, ``doctor``) run
one command as a module, for launchers.
"""

from __future__ import annotations

from typing import NoReturn

import click

from .base import Group, run_as_process
from .commands import (
    checkpoints_group,
    data_group,
    doctor_command,
    eval_command,
    rendezvous_command,
    report_command,
    train_command,
)
from .inference import export_command, predict_command, serve_command

__all__ = ["main", "entry_point", "run_as_process", "train_command", "eval_command", "doctor_command"]


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


def entry_point() -> NoReturn:
    """The ``mnist-dist`` console script."""
    run_as_process(main, prog_name="mnist-dist")
