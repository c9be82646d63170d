"""Start-up with a bound: every process finds the others within a timeout, or the run ends
with one line saying where it waited, for how long, and what to check.

Left to itself, torch waits up to ten minutes for a missing main process, retries, and
reports with a C++ stack dump. Here, before the Accelerator is built, each process

1. waits for the main address and port to accept connections (a plain socket: silent, and
   the deadline is exact),
2. opens the TCP store there (rank 0 hosts it, unless torchrun's agent already does),
3. counts arrivals in the store until all ``world_size`` processes are in,

then initialises the default process group on that store; Accelerate takes it as it is.
torch's own messages during these steps go to a debug log, not the terminal.

``mnist-dist rendezvous`` does the same for whole nodes before a launcher starts (the job
scripts in ``launch/`` use it): the launcher's own rendezvous then finds every node
already there.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import RendezvousError, first_line
from .waiting import Signalled, call_before, stderr_to_debug_log, stop_on_signals, time_left, where_written

PREFLIGHT = "preflight: mnist-dist doctor, launched the same way (or sbatch launch/doctor.sbatch)"
ADDRESS_HINT = "MAIN_ADDR / --main_process_ip / MASTER_ADDR"
PORT_HINT = "MAIN_PORT / --main_process_port / MASTER_PORT"
_POLL = 0.05  # seconds between looks at the arrival count


@dataclass(frozen=True)
class Peers:
    """Who this process is and where the main process listens."""

    rank: int
    world_size: int
    addr: str
    port: int
    node: str  # this process's node, for the message
    agent_store: bool = False  # torchrun's agent already hosts the store at addr:port
    scope: str = "mnist_dist"  # store keys of this launch attempt
    unit: str = "rank"  # what is counted: processes ("rank") or whole nodes ("node")

    @property
    def hosts(self) -> bool:
        return self.rank == 0 and not self.agent_store

    @property
    def who(self) -> str:
        return f"{self.unit} {self.rank} of {self.world_size} (node {self.node})"


def node_name(env: Any = os.environ) -> str:
    """The node's name as the scheduler knows it (SLURM), else the host name."""
    return env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def peers_from_env(env: Any = os.environ) -> Peers | None:
    """The torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); None on one process."""
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise RendezvousError(
            f"WORLD_SIZE is {world_size} but {', '.join(missing)} not set; start the processes with "
            "accelerate launch or torchrun, or set RANK, MASTER_ADDR and MASTER_PORT for every process"
        )
    attempt = f"{env.get('TORCHELASTIC_RUN_ID', 'none')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return Peers(
        rank=int(env["RANK"]),
        world_size=world_size,
        addr=env["MASTER_ADDR"],
        port=int(env["MASTER_PORT"]),
        node=node_name(env),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        scope=f"mnist_dist/{attempt}",
    )


def join(peers: Peers, timeout: float):
    """Meet every other process within ``timeout`` seconds; return the store (a ``PrefixStore``).

    Raises ``RendezvousError`` with one line when the time is up or the main process is
    unreachable. Nothing is retried past the deadline.
    """
    from torch.distributed import PrefixStore

    deadline = time.monotonic() + timeout
    arrived = [0]
    with stderr_to_debug_log(f"mnist-dist-rendezvous-{peers.node}") as debug_log:
        try:
            store = _host(peers, deadline) if peers.hosts else _connect(peers, deadline, timeout)
            _count_arrivals(store, peers, deadline, timeout, arrived)
        except RendezvousError as exc:
            raise RendezvousError(f"{exc}{where_written(debug_log)}") from None
        except Signalled as exc:
            stopped = RendezvousError(
                f"{peers.who} was stopped by {exc.name} while waiting at {peers.addr}:{peers.port} for the "
                f"others ({arrived[0]} of {peers.world_size} {peers.unit}s in): a node that failed ends the whole "
                f"job step, so look for the first error in the other nodes' output; {PREFLIGHT}"
                f"{where_written(debug_log)}"
            )
            stopped.exit_code = 128 + exc.signum  # as for any process a signal ends: 130 after Ctrl-C
            raise stopped from None
    return PrefixStore(peers.scope, store)


def wait_for_nodes(nodes: int, node_rank: int, addr: str, port: int, timeout: float) -> float:
    """Node-level rendezvous of the job scripts: return once all ``nodes`` are up (seconds waited).

    Node 0 hosts a store on ``addr:port`` for the time of the wait; the launcher takes
    the port over afterwards. A stop signal (a scheduler ending the job step) ends the
    wait with the one line, naming how many nodes had arrived. A rank that is not one of
    ``nodes`` is refused at once (it would wait for a node that never comes).
    """
    if not 0 <= node_rank < nodes:
        raise RendezvousError(f"node rank {node_rank} is not a node of {nodes}: node ranks are 0 to {nodes - 1}")
    if nodes <= 1:
        return 0.0
    start = time.monotonic()
    peers = Peers(
        rank=node_rank, world_size=nodes, addr=addr, port=port, node=node_name(), scope="mnist_dist/nodes", unit="node"
    )
    with stop_on_signals():
        join(peers, timeout)
    return time.monotonic() - start


def init_process_group(backend: str, timeout: float, collective_timeout: float) -> bool:
    """Join the other processes (bounded by ``timeout``) and create the default process group.

    Does nothing on one process or when a process group exists already. Returns whether
    it created one.
    """
    import torch.distributed as dist

    peers = peers_from_env()
    if peers is None or dist.is_initialized():
        return False
    store = join(peers, timeout)
    store.set_timeout(timedelta(seconds=collective_timeout))  # from now on a wait is a collective's
    dist.init_process_group(
        backend,
        store=store,
        rank=peers.rank,
        world_size=peers.world_size,
        timeout=timedelta(seconds=collective_timeout),
    )
    return True


# -- the steps -------------------------------------------------------------------------------


def _host(peers: Peers, deadline: float):
    """Rank 0: listen on the port (all interfaces) and prove the main address reaches it."""
    from torch.distributed import TCPStore

    try:
        # The server listens on every interface; its own client goes through loopback.
        store = TCPStore(
            "127.0.0.1",
            peers.port,
            None,
            True,
            timedelta(seconds=time_left(deadline, 1)),
            wait_for_workers=False,
            multi_tenant=True,
        )
    except Exception as exc:  # DistNetworkError: the port is taken
        raise RendezvousError(
            f"{peers.who} cannot listen on port {peers.port} ({first_line(exc)}); choose a free port "
            f"({PORT_HINT}); {PREFLIGHT}"
        ) from None
    _resolve(peers)
    return store


def _connect(peers: Peers, deadline: float, timeout: float):
    """Every other process: wait for the port to open, then open the store as a client."""
    from torch.distributed import TCPStore

    ip = _resolve(peers)
    reason = wait_for_port(ip, peers.port, deadline)
    if reason is not None:
        raise RendezvousError(_unreachable(peers, timeout, reason))
    # The port answers, so a store there answers at once. torch's client retries past its own
    # timeout (about 1.5-3 times it), so it gets a third of the time left: it gives up (and
    # stops writing retries) before the deadline; ``call_before`` bounds it in any case.
    try:
        return call_before(
            deadline,
            lambda: TCPStore(
                peers.addr,
                peers.port,
                None,
                False,
                timedelta(seconds=time_left(deadline, 3) / 3),
                wait_for_workers=False,
            ),
        )
    except (TimeoutError, RuntimeError) as exc:
        raise RendezvousError(
            f"{peers.who} reached {peers.addr}:{peers.port}, but no main process of this run answered there "
            f"within {timeout:g} s ({first_line(exc)}): check the main address ({ADDRESS_HINT}) and port "
            f"(another service may use port {peers.port}); {PREFLIGHT}"
        ) from None


def wait_for_port(ip: str, port: int, deadline: float) -> str | None:
    """Try to connect until ``deadline``; None once the port accepts, else the last error (one phrase)."""
    reason = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return reason
        try:
            with socket.create_connection((ip, port), timeout=min(2.0, left)):
                return None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if isinstance(exc, socket.timeout):
                reason = "no answer"
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _count_arrivals(store, peers: Peers, deadline: float, timeout: float, arrived: list[int]) -> None:
    """Add this process to the count and wait until all are in (bounded by ``deadline``)."""
    key = f"{peers.scope}/arrived"
    start = time.monotonic()
    try:
        arrived[0] = store.add(key, 1)
        while arrived[0] < peers.world_size:
            if time.monotonic() > deadline:
                raise RendezvousError(_missing(peers, timeout, arrived[0]))
            time.sleep(_POLL)
            arrived[0] = store.add(key, 0)
        if peers.unit == "node":  # the store outlives this step only if the host waits for the others to leave
            _leave(store, peers, key, deadline)
    except (RuntimeError, OSError) as exc:  # the store went away: the main process stopped
        if isinstance(exc, RendezvousError):
            raise
        raise RendezvousError(
            f"{peers.who} lost the main process at {peers.addr}:{peers.port} after {time.monotonic() - start:.0f} s "
            f"({arrived[0]} of {peers.world_size} {peers.unit}s were in): it stopped, or gave up waiting for the "
            f"others; check every node's log and that all of them start with the same main address and port; "
            f"{PREFLIGHT}"
        ) from None


def _leave(store, peers: Peers, key: str, deadline: float) -> None:
    """Node rendezvous: the host keeps its store up until every other node has seen the full count."""
    left = store.add(f"{key}/left", 1)
    end = max(deadline, time.monotonic() + 10)
    while peers.hosts and left < peers.world_size and time.monotonic() < end:
        time.sleep(_POLL)
        left = store.add(f"{key}/left", 0)


# -- messages and helpers --------------------------------------------------------------------


def _unreachable(peers: Peers, timeout: float, reason: str) -> str:
    return (
        f"{peers.who} could not reach the main process at {peers.addr}:{peers.port} within {timeout:g} s "
        f"({reason}): check that the first node is up and started this job, that the main address is right "
        f"({ADDRESS_HINT}) and that port {peers.port} is open between the nodes; {PREFLIGHT}"
    )


def _missing(peers: Peers, timeout: float, arrived: int) -> str:
    return (
        f"{peers.who} waited {timeout:g} s at {peers.addr}:{peers.port} and {arrived} of {peers.world_size} "
        f"{peers.unit}s arrived: check that every node started this job with the same main address and port "
        f"and can reach {peers.addr}:{peers.port} (firewall); {PREFLIGHT}"
    )


def _resolve(peers: Peers) -> str:
    try:
        return socket.gethostbyname(peers.addr)
    except OSError as exc:
        raise RendezvousError(
            f"{peers.who}: the main address '{peers.addr}' does not resolve ({exc.strerror or exc}); set it to "
            f"the first node's name or IP ({ADDRESS_HINT}); {PREFLIGHT}"
        ) from None
