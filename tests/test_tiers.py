"""The test tiers (tiers.py): which tests are slow, and the watch that keeps the fast tier process-free."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import tiers

import conftest
import serving


def _thread_only():
    worker = threading.Thread(target=print)
    worker.start()  # an attribute named like conftest.start: not a process
    worker.join()


def _through_a_context_manager():
    with serving.running_server("model.safetensors"):
        pass


def _imports_a_helper_in_its_body():
    from conftest import run_cli

    return run_cli


def test_the_scan_follows_helpers_fixtures_and_imports_but_not_attribute_names():
    scan = tiers.ProcessScan()
    assert scan.reaches(conftest.run_cli) and scan.reaches(conftest.train)  # train -> run_cli -> subprocess
    assert scan.reaches(_through_a_context_manager)  # a @contextmanager helper in another module
    assert scan.reaches(_imports_a_helper_in_its_body)
    assert not scan.reaches(_thread_only)
    assert not scan.reaches(conftest.skip_or_fail) and not scan.reaches(conftest.read_until)


@pytest.mark.slow  # it starts processes the scan cannot see: the watch would fail it in the fast tier
def test_the_watch_sees_every_way_a_process_starts_and_lets_it_start():
    import importlib

    fork = os.fork
    spawn = importlib.import_module("multiprocessing").get_context("spawn")  # hidden from the scan, on purpose
    run = importlib.import_module("subprocess").run
    with tiers.ProcessWatch() as watch:
        assert run(["true"]).returncode == 0
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        child = spawn.Process(target=int)
        child.start()
        child.join()
        assert child.exitcode == 0
    assert watch.started[:2] == ["['true']", "os.fork"] and len(watch.started) >= 3, watch.started
    assert os.fork is fork  # put back
    with tiers.ProcessWatch() as idle:
        _thread_only()
        with tiers.session_setup():  # a session fixture's fetch, say
            assert run(["true"]).returncode == 0
        sys.modules.pop("probing_at_import", None)
        importlib.import_module("probing_at_import")  # a library that runs a command when imported
    assert idle.started == []
