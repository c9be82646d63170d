"""Run ``mnist-dist serve`` as a real process on a free loopback port, and always stop it; or
serve an app built in the test, by a thread, as that command serves it.

Used by the tests, ``bench/serve_load.py`` and ``scripts/make_serve_figure.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(r"on (http://127\.0\.0\.1:\d+/)")


class Server:
    """A running ``mnist-dist serve`` process: its base URL, its output so far, its process."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.url = ""
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def health(self, timeout: float = 5) -> dict:
        with urllib.request.urlopen(self.url + "healthz", timeout=timeout) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout: float) -> None:
        """Wait for the URL line, then for ``GET /healthz`` to answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"mnist-dist serve exited with status {self.process.returncode}:\n{self.output}")
            found = self.url or next((m.group(1) for m in map(URL_LINE.search, list(self.lines)) if m), "")
            if found:
                self.url = found
                try:
                    self.health(timeout=2)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"mnist-dist serve did not answer within {timeout} s:\n{self.output}")

    def stop(self) -> int:
        """SIGTERM (a graceful shutdown), then SIGKILL if it has not ended within 10 s; the exit status."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return self.process.returncode


@contextmanager
def running_server(weights: str | os.PathLike, *options: str, timeout: float = 90) -> Iterator[Server]:
    """``mnist-dist serve --weights WEIGHTS --host 127.0.0.1 --port 0 OPTIONS...``, ready, stopped on exit."""
    cmd = [
        sys.executable,
        "-m",
        "mnist_dist.cli",
        "serve",
        "--weights",
        str(weights),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *options,
    ]
    process = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server = Server(process)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


@contextmanager
def serving_in_thread(app, timeout: float = 30) -> Iterator[str]:
    """``app`` served on a free loopback port by uvicorn in a thread of this process, with the
    settings of ``mnist-dist serve`` (its logs go to this process's logging); its base URL."""
    import uvicorn

    from mnist_dist.inference.serve import listen, server_config

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
