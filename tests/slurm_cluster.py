"""A throwaway two-node SLURM cluster on this machine, to run the job scripts for real.

Both nodes (n1, n2) are ``slurmd`` daemons on this host, each with its own port and spool
directory; ``slurmctld`` and all state, spool and log files live in a temporary directory.
Installing the packages (slurmctld, slurmd, slurm-client, munge) is CI's job (``.ci/run``);
``missing_reason()`` says why the cluster cannot be started here, for a pytest skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NODES = ("n1", "n2")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "squeue", "scancel")
# Daemons live in /usr/sbin, which is not on every PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
MUNGE_KEY = Path("/etc/munge/munge.key")
HOSTS = Path("/etc/hosts")
END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def missing_reason() -> str | None:
    """Why a cluster cannot be started here (for ``pytest.skip``), or None if it can."""
    missing = [p for p in PROGRAMS if shutil.which(p, path=SEARCH_PATH) is None]
    if missing:
        return (
            f"SLURM/munge not installed (missing {', '.join(missing)}); "
            "apt-get install slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        return "starting slurmctld, slurmd and munged needs root"
    return None


@dataclass
class SlurmCluster:
    """A running cluster: ``env`` points SLURM's commands at its configuration.

    ``node_local`` is a directory each node sees as its own (like a node's /tmp or local
    scratch): each slurmd runs in a mount namespace of its own with a tmpfs there. None
    where mount namespaces are not available.
    """

    root: Path
    conf: Path
    env: dict[str, str]
    node_local: Path | None = None

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM command (sinfo, sbatch, ...) against this cluster."""
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def submit(self, *args: str, cwd: Path, env: dict[str, str]) -> int:
        """``sbatch ARGS`` from ``cwd`` with the job environment ``env``; returns the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**env, "SLURM_CONF": str(self.conf)},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait for a job to end (cancelling it after ``timeout`` s); returns ``scontrol show job`` fields."""
        job: dict[str, str] = {}

        def ended() -> bool:
            out = self.run("scontrol", "--oneliner", "show", "job", str(job_id), check=False).stdout
            job.update(kv.split("=", 1) for kv in out.split() if "=" in kv)
            return job.get("JobState") in END_STATES

        try:
            wait_until(ended, timeout, f"job {job_id} to end")
        except TimeoutError:
            self.run("scancel", str(job_id), check=False)
            raise
        return job

    def idle_nodes(self) -> list[str]:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.split()[1:] == ["idle"]]


def free_ports(n: int) -> list[int]:
    """N distinct ports that are free now (the kernel's choice, so parallel runs do not collide)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_config(root: Path) -> Path:
    """slurm.conf for two one-CPU nodes on this host; every path under ``root``."""
    host = socket.gethostname().split(".")[0]
    ctld_port, *node_ports = free_ports(1 + len(NODES))
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 RealMemory=1000 State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=testcluster
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SchedulerType=sched/builtin
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def munge_works() -> bool:
    return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0


def start_munged() -> subprocess.Popen | None:
    """Start munged (as user munge, in the foreground) unless one already answers; returns ours."""
    if munge_works():
        return None
    if not MUNGE_KEY.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)], check=True, capture_output=True)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["chown", "-R", "munge:munge", "/run/munge", "/etc/munge", "/var/log/munge", "/var/lib/munge"], check=True
    )
    munged = subprocess.Popen(
        ["su", "-s", "/bin/sh", "munge", "-c", "exec munged --foreground --force"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(munge_works, 15, "munged to answer")
    return munged


@contextmanager
def node_names_resolve() -> Iterator[None]:
    """Map n1/n2 to 127.0.0.1 in /etc/hosts (as a cluster's DNS would), restoring the file after."""
    original = HOSTS.read_text()
    missing = [n for n in NODES if not _resolves(n)]
    if missing:
        HOSTS.write_text(original + "".join(f"127.0.0.1 {n}\n" for n in missing))
    try:
        yield
    finally:
        if missing:
            HOSTS.write_text(original)


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def processes_using(conf: Path) -> list[int]:
    """Pids of processes whose environment names this cluster's config (daemons, job steps, jobs)."""
    marker = f"SLURM_CONF={conf}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass  # gone, or not ours to read
    return pids


def wait_until(condition, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def running_cluster(root: Path, start_timeout: float = 60) -> Iterator[SlurmCluster]:
    """Start munged (if needed), slurmctld and two slurmd; yield the cluster; stop everything."""
    conf = write_config(root)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SEARCH_PATH}
    node_local = root / "node-local"
    node_local.mkdir(exist_ok=True)
    cluster = SlurmCluster(root, conf, env, node_local if mount_namespaces_work(node_local) else None)
    munged = start_munged()
    daemons: list[subprocess.Popen] = []
    with node_names_resolve():
        try:
            # -D: stay in the foreground, so these are our children and easy to stop.
            commands = {"slurmctld": ["slurmctld", "-D"]}
            commands.update({f"slurmd-{n}": _slurmd_command(n, cluster.node_local) for n in NODES})
            for name, cmd in commands.items():
                with open(root / "log" / f"{name}.stderr", "wb") as log:
                    daemons.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            wait_until(
                lambda: sorted(cluster.idle_nodes()) == list(NODES),
                start_timeout,
                f"2 idle nodes in sinfo (logs in {root / 'log'})",
            )
            yield cluster
        finally:
            _stop(cluster, daemons, munged)


def mount_namespaces_work(path: Path) -> bool:
    """Whether a process can get a private tmpfs at ``path`` (root, and a kernel that allows it)."""
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", str(path)], capture_output=True
    )
    return probe.returncode == 0


def _slurmd_command(node: str, node_local: Path | None) -> list[str]:
    """slurmd for ``node``; with ``node_local``, in its own mount namespace with a tmpfs there."""
    if node_local is None:
        return ["slurmd", "-D", "-N", node]
    script = f'mount -t tmpfs tmpfs "$0" && exec slurmd -D -N {node}'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(node_local)]


def _stop(cluster: SlurmCluster, daemons: list[subprocess.Popen], munged: subprocess.Popen | None) -> None:
    """Cancel jobs, shut the daemons down, then kill whatever of this cluster is still running."""
    if daemons and daemons[0].poll() is None:
        try:
            cluster.run("scancel", "--full", "--quiet", "--user=root", check=False)
            cluster.run("scontrol", "shutdown", check=False)
        except subprocess.TimeoutExpired:
            pass  # the kills below still stop everything
    deadline = time.monotonic() + 15
    for p in daemons:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    # Anything left of a job (slurmstepd, srun, training processes) still carries our SLURM_CONF.
    for pid in processes_using(cluster.conf):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if munged is not None:
        munged.terminate()  # su passes the signal on to munged and waits for it
        munged.wait(timeout=15)
