"""Profiler traces on demand: ``profile_steps: 200-220`` traces those optimizer steps on every rank.

Each rank writes one Chrome-trace JSON file, ``profiles/rank-{rank}.steps-{first}-{last}.pt.trace.json``
in the run directory: TensorBoard's profiler plugin lists files by that suffix, and Perfetto
(ui.perfetto.dev) or ``chrome://tracing`` open them directly. Outside the window nothing is
profiled and no profiler exists, so only the window's steps pay for it. The main process
attaches the traces to the wandb run as an artifact of type ``profile``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("mnist_dist")

PROFILES_DIR = "profiles"
TRACE_SUFFIX = ".pt.trace.json"  # what torch-tb-profiler looks for


def profiles_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run's profiler traces are."""
    return Path(run_dir) / PROFILES_DIR


def trace_path(run_dir: str | os.PathLike, rank: int, first: int, last: int) -> Path:
    """The trace file of ``rank`` covering optimizer steps ``first`` to ``last``."""
    return profiles_dir(run_dir) / f"rank-{rank}.steps-{first}-{last}{TRACE_SUFFIX}"


def trace_files(run_dir: str | os.PathLike) -> list[Path]:
    """The traces a run wrote (all ranks, all windows), sorted; none if it profiled nothing."""
    return sorted(profiles_dir(run_dir).glob(f"*{TRACE_SUFFIX}"))


class StepProfiler:
    """Profiles the optimizer steps ``steps = (first, last)`` of one rank, and writes their trace.

    The training loop calls ``before_step(n)`` just before optimizer step ``n`` (1-based)
    begins and ``after_step(n)`` once it is done, and ``close()`` when training ends or stops,
    however it stops. The profiler starts at the first step of the window that this process
    runs (a run resumed inside the window profiles the rest of it) and stops, writing the
    trace, after the window's last step or at ``close()``, whichever comes first. The file is
    named for the steps it holds: a run closed at step 4 of ``3-5`` writes ``steps-3-4``.
    """

    def __init__(self, run_dir: str | os.PathLike, steps: tuple[int, int] | None, rank: int, device_type: str) -> None:
        self.run_dir, self.steps, self.rank, self.device_type = Path(run_dir), steps, rank, device_type
        self.written: Path | None = None  # the trace written last, if any
        self._prof = None
        self._mark = None  # the open ``step n`` range
        self._first = self._last = 0  # the first and last step begun under the profiler

    def _in_window(self, step: int) -> bool:
        return self.steps is not None and self.steps[0] <= step <= self.steps[1]

    def before_step(self, step_about_to_run: int) -> None:
        """Call just before optimizer step ``step_about_to_run`` (1-based) begins: starts the
        profiler at the window's first step run here, and opens the step's ``step n`` range."""
        if not self._in_window(step_about_to_run):
            return
        if self._prof is None:
            self._start(step_about_to_run)
        self._end_mark()  # an after_step that never came: the range must not swallow this step
        self._last = step_about_to_run
        self._mark = torch.profiler.record_function(f"step {step_about_to_run}")
        self._mark.__enter__()

    def after_step(self, step_done: int) -> None:
        """Call once optimizer step ``step_done`` is done: closes its range, and after the
        window's last step stops the profiler and writes the trace."""
        if self._prof is None:
            return
        self._end_mark()
        if step_done >= self.steps[1]:
            self._finish()

    def close(self) -> None:
        """Stop a profile still open (training ended or stopped inside the window) and write
        what it holds. Safe to call any number of times, and when nothing was profiled."""
        if self._prof is not None:
            self._finish()

    def _start(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device_type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # Shapes and stacks would make each op costlier and the file far larger; step timing is the point.
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self._prof.start()
        self._first = step

    def _end_mark(self) -> None:
        if self._mark is not None:
            mark, self._mark = self._mark, None
            mark.__exit__(None, None, None)

    def _finish(self) -> None:
        self._end_mark()
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # the window's last kernels belong in the trace
        prof, self._prof = self._prof, None
        prof.stop()
        self.written = _export(prof, trace_path(self.run_dir, self.rank, self._first, self._last))


def _export(prof, path: Path) -> Path | None:
    """Write ``prof``'s Chrome trace to ``path`` atomically (temporary name, then rename); return
    the path, or None after a warning if it could not be written: a trace is not worth a run."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # no temporary file, or no directory to hold one
            tmp.unlink()
        log.warning("could not write the profiler trace %s (%s); training goes on", path, exc.strerror or exc)
        return None
    log.info("profiler trace written: %s", path)
    return path


def log_to_wandb(run, run_dir: str | os.PathLike) -> None:
    """Attach the run's traces to the wandb run ``run`` as one artifact of type ``profile``,
    named ``profile-{run.id}``. No-op when ``run`` is None or there are no traces.

    Call on the main process once every rank has written its trace (after a barrier), before
    the wandb run finishes. A failure is a warning: wandb must never stop training.
    """
    files = trace_files(run_dir)
    if run is None or not files:
        return
    try:
        import wandb  # not at module import: training without wandb must not load it

        artifact = wandb.Artifact(
            f"profile-{run.id}", type="profile", description="torch.profiler traces, one per rank and step window"
        )
        for path in files:
            artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact)
    except Exception as exc:
        log.warning(
            "wandb failed to attach the profiler traces (%s: %s); they are in %s",
            type(exc).__name__,
            exc,
            profiles_dir(run_dir),
        )
