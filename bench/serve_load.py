"""Load test of ``mnist-dist serve``: concurrent clients on loopback, a fixed number of requests, a time limit.

    python bench/serve_load.py --weights runs/reference/model.safetensors \\
        [--clients 8] [--singles 2000] [--batches 150] [--time-limit 240] [--write bench/RESULTS.md]

Starts the server as its own process on 127.0.0.1 (a free port), then runs, one after the
other: a phase of single-image requests, a phase of batches of 64, and the single phase
again (to see whether memory stays flat). In every phase, CLIENTS threads, each with its
own keep-alive connection, send the phase's requests until the count is reached or the
time limit passes; one more client sends garbage all along (not images, empty and
truncated files, bad JSON, wrong lengths, too many files, oversized bodies, wrong content
types) and checks that each gets a 4xx JSON error. The images are MNIST test digits drawn
as dark ink on light paper (PNG, about 100x100), so every answer is also checked against
the true label.

Reported per phase: requests/s (and images/s), p50/p99 latency, requests that failed (a
status other than 200) or were dropped (no answer: connection refused, reset, timeout),
requests not sent before the time limit, and the server's resident memory (VmRSS) after
each phase. ``--write`` appends the table, with the command, to a Markdown file.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from mnist_dist.data.idx import load_split  # noqa: E402
from mnist_dist.data.sources import ensure_dataset  # noqa: E402

from serving import running_server  # noqa: E402  (the tests' helper: start, wait until ready, stop)

BATCH = 64


def on_paper(digit: np.ndarray) -> bytes:
    """An MNIST digit as a PNG picture: dark ink on light paper, enlarged 3x, off-centre."""
    amount = np.asarray(Image.fromarray(digit).resize((84, 84), Image.Resampling.BICUBIC), np.float64) / 255
    amount = np.pad(amount, ((10, 6), (4, 12)))
    buf = io.BytesIO()
    Image.fromarray((235 - 215 * amount).round().astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body with ``files`` as fields named ``file``, and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass
class Request:
    body: bytes
    content_type: str
    labels: list[int]


@dataclass
class Tally:
    """What the clients of one phase saw."""

    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    dropped: int = 0
    wrong_digits: int = 0
    images: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def post(conn: http.client.HTTPConnection, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": content_type})
    response = conn.getresponse()
    return response.status, response.read()


def client(host: str, port: int, requests: list[Request], counter: iter, deadline: float, tally: Tally) -> None:
    """Send requests (taken from the shared ``counter``) on one keep-alive connection until none are left."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    for n in counter:
        if time.monotonic() > deadline:
            break
        request = requests[n % len(requests)]
        start = time.perf_counter()
        try:
            status, body = post(conn, "/predict", request.body, request.content_type)
        except (OSError, http.client.HTTPException):
            with tally.lock:
                tally.dropped += 1
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            continue
        elapsed = time.perf_counter() - start
        digits = [r.get("digit") for r in json.loads(body).get("results", [])] if status == 200 else []
        with tally.lock:
            tally.latencies.append(elapsed)
            tally.failed += status != 200
            tally.wrong_digits += sum(d != label for d, label in zip(digits, request.labels))
            tally.images += len(digits)
    conn.close()


def garbage_requests() -> list[tuple[str, bytes, str]]:
    """(name, body, content type) of requests the server must refuse with a 4xx JSON error."""
    files = {
        "not an image": [("notes.png", b"shopping list: milk, eggs")],
        "empty file": [("empty.png", b"")],
        "truncated png": [("cut.png", on_paper(np.full((28, 28), 200, np.uint8))[:90])],
        "too many files": [(f"{i}.png", b"x") for i in range(BATCH + 1)],
    }
    return [(name, *multipart(parts)) for name, parts in files.items()] + [
        ("bad json", b"[1, 2,", "application/json"),
        ("783 values", json.dumps([0] * 783).encode(), "application/json"),
        ("values over 255", json.dumps([999] * 784).encode(), "application/json"),
        ("wrong content type", b"7", "text/plain"),
        ("oversized body", b"[" + b"0," * (17 * 2**20) + b"0]", "application/json"),
    ]


def garbage_client(host: str, port: int, stop: threading.Event, seen: dict[str, list[int]]) -> None:
    """Send garbage in a loop until ``stop``; record every status per kind (-1: no answer)."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    kinds = garbage_requests()
    n = 0
    while not stop.is_set():
        name, body, ctype = kinds[n % len(kinds)]
        n += 1
        try:
            status, answer = post(conn, "/predict", body, ctype)
            ok_json = "error" in json.loads(answer)
        except (OSError, http.client.HTTPException, ValueError):
            status, ok_json = -1, False
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
        seen.setdefault(name, []).append(status if ok_json or status < 0 else 0)
    conn.close()


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_phase(url: str, requests: list[Request], count: int, clients: int, time_limit: float) -> tuple[Tally, float]:
    host, port = url.split("//")[1].rstrip("/").split(":")
    tally, counter = Tally(), iter(range(count))
    deadline = time.monotonic() + time_limit
    threads = [
        threading.Thread(target=client, args=(host, int(port), requests, counter, deadline, tally))
        for _ in range(clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally, time.perf_counter() - start


def summary(name: str, count: int, tally: Tally, seconds: float, rss: float) -> dict:
    lat = np.array(tally.latencies) * 1000
    sent = len(tally.latencies) + tally.dropped
    return {
        "phase": name,
        "requests": f"{len(tally.latencies)}/{count}",
        "seconds": round(seconds, 1),
        "requests/s": round(len(tally.latencies) / seconds, 1),
        "images/s": round(tally.images / seconds, 1),
        "p50 ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p99 ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "failed": tally.failed,
        "dropped": tally.dropped,
        "not sent": count - sent,
        "wrong digits": f"{tally.wrong_digits}/{tally.images}",
        "RSS after, MB": round(rss),
    }


def markdown(rows: list[dict], garbage: dict[str, list[int]], rss_start: float, args, command: str) -> str:
    cols = list(rows[0])
    lines = [
        f"## `mnist-dist serve` under load ({date.today().isoformat()})",
        "",
        f"Measured on {platform.node()}: {os.cpu_count()} CPUs ({platform.machine()}), Python "
        f"{platform.python_version()}; server and {args.clients} client threads (+1 garbage client) on the "
        "same machine, over loopback.",
        "",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows),
        "",
        f"Server RSS after start and warm-up: {rss_start:.0f} MB.",
        "",
        "Garbage sent alongside (status: count; 0 = not a JSON error, -1 = no answer):",
        "",
        *(
            f"- {name}: " + ", ".join(f"{s}: {codes.count(s)}" for s in sorted(set(codes)))
            for name, codes in garbage.items()
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="runs/reference/model.safetensors")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--singles", type=int, default=2000, help="single-image requests per single phase")
    parser.add_argument("--batches", type=int, default=150, help="requests of 64 images")
    parser.add_argument("--time-limit", type=float, default=240, help="seconds per phase at most")
    parser.add_argument("--write", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    command = "python bench/serve_load.py " + " ".join(sys.argv[1:])

    images, labels = load_split(ensure_dataset(args.data_dir, "mnist"), "mnist", "test")
    pictures = [(f"{i}.png", on_paper(images[i].numpy()), int(labels[i])) for i in range(512)]
    singles = [Request(*multipart([(name, data)]), [label]) for name, data, label in pictures]
    batches = [
        Request(
            *multipart([(n, d) for n, d, _ in pictures[k : k + BATCH]]),
            [label for *_, label in pictures[k : k + BATCH]],
        )
        for k in range(0, 512, BATCH)
    ]

    with running_server(args.weights) as server:
        run_phase(server.url, singles, 50, 2, 60)  # warm-up
        rss_start = rss_mb(server.process.pid)
        garbage: dict[str, list[int]] = {}
        stop = threading.Event()
        host, port = server.url.split("//")[1].rstrip("/").split(":")
        bad = threading.Thread(target=garbage_client, args=(host, int(port), stop, garbage))
        bad.start()
        rows = []
        for name, requests, count in [
            ("single image", singles, args.singles),
            (f"batch of {BATCH}", batches, args.batches),
            ("single image, again", singles, args.singles),
        ]:
            tally, seconds = run_phase(server.url, requests, count, args.clients, args.time_limit)
            rows.append(summary(name, count, tally, seconds, rss_mb(server.process.pid)))
        stop.set()
        bad.join()
        alive = server.alive and server.health()["status"] == "ok"
    text = markdown(rows, garbage, rss_start, args, command)
    text += f"\nServer alive and healthy at the end: {'yes' if alive else 'NO'}.\n"
    print(text)
    if args.write:
        with open(args.write, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
