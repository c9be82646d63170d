"""``mnist-dist doctor``: find, in seconds, what would make a training job hang or fail.

Run it the way training runs: one process, ``accelerate launch ... -m mnist_dist.doctor``,
torchrun, or ``sbatch launch/doctor.sbatch`` on every node of an allocation. Every rank
looks at itself (versions, devices, SLURM, run directory, data), the ranks meet within
a short timeout, exchange a real all-reduce and all-gather, check that the run directory
is the same on every node, and the main process prints one table and writes a JSON report.
It also runs what training checks before its first step on the same launch and config
(``startup.py``: the batch split, the run directory's lock and resume point), so that "all
checks passed" means training will start. The exit status is 1 when training would fail or hang.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ..config import FIELDS, Config, global_batch_size
from ..runs import DOCTOR_FILE
from . import startup, verdicts
from .collectives import check_collectives
from .facts import FAIL, OK, Check, local_facts, sees_token, wandb_plan, write_token

DOCTOR_TIMEOUT = 60  # seconds to meet the others, unless rendezvous_timeout is set


def doctor_timeout(cfg: Config) -> int:
    """The doctor waits a minute for the others; a ``rendezvous_timeout`` of one's own wins."""
    return DOCTOR_TIMEOUT if cfg.rendezvous_timeout == FIELDS["rendezvous_timeout"].default else cfg.rendezvous_timeout


def run_doctor(cfg: Config, report: str | None = None) -> int:
    """Check everything on every rank; the main process prints the table and writes the report.

    Returns the exit status (1 if any check failed), the same on every rank. A rank that
    cannot reach the main process raises ``RendezvousError`` (one line); a main process
    whose ranks never come reports that in its table.
    """
    from ..distributed.runtime import build_accelerator, end_process_group, setup_logging
    from ..errors import RendezvousError

    facts = local_facts(cfg)
    start = time.monotonic()
    try:
        accelerator = build_accelerator(dataclasses.replace(cfg, rendezvous_timeout=doctor_timeout(cfg)))
    except RendezvousError as exc:
        if facts["rank"] != 0:
            raise
        return _report_alone(cfg, facts, exc, report)
    setup_logging(accelerator.is_main_process)
    joined = time.monotonic() - start
    facts["sees_token"] = _sees_main_token(cfg, accelerator)
    comm, figures = check_collectives(accelerator, cfg.hidden_sizes, global_batch_size(cfg, accelerator.num_processes))
    from accelerate.utils import gather_object

    everyone = sorted(gather_object([facts]), key=lambda f: f["rank"])
    world = _training_world(everyone, accelerator.num_processes)
    checks = _verdicts(cfg, everyone, world, _main_checks(cfg, accelerator, world))
    checks.insert(4, _met(accelerator.num_processes, joined))
    checks.insert(5, comm)
    if accelerator.is_main_process:
        _publish(cfg, checks, everyone, figures, report)
    end_process_group(accelerator)
    return 1 if any(c.status == FAIL for c in checks) else 0


def _verdicts(cfg: Config, facts: list[dict[str, Any]], world: int, main_checks: list[Check]) -> list[Check]:
    return [
        verdicts.versions_agree(facts),
        verdicts.devices_seen(facts),
        verdicts.launch_shape(facts),
        verdicts.slurm_allocation(facts),
        *verdicts.run_directory(facts, cfg.output_dir),
        verdicts.data_present(facts, cfg.data_dir, cfg.dataset),
        startup.batch_split(cfg, world),
        *main_checks,
    ]


def _training_world(facts: list[dict[str, Any]], doctors: int) -> int:
    """The processes training starts on this launch: on each node, the ones its facts report
    (``procs_per_node``: PROCS_PER_NODE under launch/doctor.sbatch, which runs one doctor per node).
    ``facts`` of every rank, or only rank 0's when the others never came (``doctors``: the ranks meant)."""
    import os

    per_node = {f["node"]: f["procs_per_node"] for f in facts}
    if len(facts) == doctors:
        return sum(per_node.values())
    return doctors // int(os.environ.get("LOCAL_WORLD_SIZE") or 1) * facts[0]["procs_per_node"]


def _on_main(cfg: Config, world: int) -> list[Check]:
    """The checks only the main process runs: the resume point (under the run directory's lock), wandb."""
    return [startup.resume_plan(cfg, world), wandb_plan(cfg, cfg.output_dir)]


def _main_checks(cfg: Config, accelerator, world: int) -> list[Check]:
    """``_on_main``'s checks, shared with every rank (the exit status is the same everywhere)."""
    box = [_on_main(cfg, world) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box)
    return box[0]


def _met(world: int, seconds: float) -> Check:
    import os

    if world == 1:
        return Check("rendezvous", OK, "one process")
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return Check("rendezvous", OK, f"{world} of {world} ranks met at {where} in {seconds:.1f} s")


def _sees_main_token(cfg: Config, accelerator) -> bool:
    """The main process writes a token into the run directory; does this rank read it back?"""
    from accelerate.utils import broadcast_object_list

    written = [None, None]
    if accelerator.is_main_process:
        try:
            path, token = write_token(cfg.output_dir)
            written = [str(path), token]
        except OSError:
            pass  # not writable: the run-directory check says so
    broadcast_object_list(written)
    seen = written[0] is not None and sees_token(*written)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and written[0] is not None:
        Path(written[0]).unlink(missing_ok=True)
    return seen


def _report_alone(cfg: Config, facts: dict[str, Any], exc: Exception, report: str | None) -> int:
    """Rank 0 waited in vain: its own checks, and the rendezvous line."""
    from ..distributed.runtime import world_size_from_env

    facts["sees_token"] = True  # no other node to compare with
    world = _training_world([facts], world_size_from_env())  # the launch that was meant, not the ranks that came
    checks = _verdicts(cfg, [facts], world, _on_main(cfg, world))
    checks.insert(4, Check("rendezvous", FAIL, str(exc)))
    _publish(cfg, checks, [facts], {}, report)
    return 1


def _publish(
    cfg: Config, checks: list[Check], facts: list[dict[str, Any]], figures: dict[str, Any], report: str | None
) -> None:
    """The table on the terminal, the JSON report in the run directory (or ``report``)."""
    import click

    from ..runs import RunDirError, write_json

    nodes = sorted({f["node"] for f in facts})
    click.echo(
        format_table(
            checks, f"mnist-dist doctor: {len(facts)} process(es) on {len(nodes)} node(s) ({', '.join(nodes)})"
        )
    )
    path = Path(report) if report else Path(cfg.output_dir) / DOCTOR_FILE
    failed = [c.name for c in checks if c.status == FAIL]
    body = {
        "ok": not failed,
        "failed": failed,
        "checks": [dataclasses.asdict(c) for c in checks],
        "collectives": figures,
        "ranks": facts,
        "config": cfg.to_dict(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, body)
        where = f"report: {path}"
    except (OSError, RunDirError) as exc:
        where = f"report not written: {exc}"
    verdict = (
        f"{len(failed)} check(s) failed ({', '.join(failed)}): training would fail or hang"
        if failed
        else "all checks passed"
    )
    click.echo(f"{verdict}; {where}")


def format_table(checks: list[Check], title: str) -> str:
    """One line per check: name, result, detail (for a failure: what is wrong and the fix)."""
    width = max(len(c.name) for c in checks)
    lines = [title, f"{'check':<{width}}  result  detail"]
    lines += [f"{c.name:<{width}}  {c.status.upper():<6}  {c.detail}" for c in checks]
    return "\n".join(lines)
