"""The collectives ``mnist-dist doctor`` runs for real: an all-reduce and an all-gather that must
return the right values, their latency, and the all-reduce at the model's gradient size against
one training step's compute, which says in a second whether N processes will beat one."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from .facts import FAIL, OK, Check


def _median_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    for _ in range(3):  # warm-up: connections, allocations
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_seconds(hidden_sizes, batch: int, device, sync) -> float:
    """Median time of one training step of the model (forward, backward, SGD) at ``batch`` on this process."""
    import torch
    import torch.nn.functional as F

    from ..model import MLP

    model = MLP(hidden_sizes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(batch, 784, device=device), torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return _median_seconds(step, 20, sync)


def _exchange_is_correct(accelerator) -> Check | None:
    """A real all-reduce and all-gather: None if they return the right values, else the failure."""
    import torch

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    total = accelerator.reduce(torch.tensor([rank + 1.0], device=device), reduction="sum").item()
    ranks = accelerator.gather(torch.tensor([rank], device=device)).tolist()
    if total == world * (world + 1) / 2 and ranks == list(range(world)):
        return None
    return Check(
        "collectives",
        FAIL,
        f"all-reduce gave {total:g} (expected {world * (world + 1) // 2}) and "
        f"all-gather {ranks}: the {torch.distributed.get_backend()} backend is broken; check the "
        "network interface (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME)",
    )


def _timings(accelerator, hidden_sizes, global_batch: int) -> dict[str, Any]:
    """Latency and gradient-size all-reduce time, and one step's compute alone and shared (seconds)."""
    import torch

    from ..model import MLP

    world, device = accelerator.num_processes, accelerator.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    numel = sum(p.numel() for p in MLP(hidden_sizes).parameters())
    one, grad = torch.ones(1, device=device), torch.ones(numel, device=device)
    return {
        "numel": numel,
        "latency": _median_seconds(lambda: accelerator.reduce(one, reduction="sum"), 20, sync),
        "allreduce": _median_seconds(lambda: accelerator.reduce(grad, reduction="sum"), 10, sync),
        "alone": step_seconds(hidden_sizes, global_batch, device, sync),
        "shared": step_seconds(hidden_sizes, max(1, global_batch // world), device, sync),
    }


def check_collectives(accelerator, hidden_sizes, global_batch: int) -> tuple[Check, dict[str, Any]]:
    """A real all-reduce and all-gather (right values?), their latency, and the bandwidth at the
    model's gradient size, against one step's compute: whether N processes beat one."""
    import torch

    world = accelerator.num_processes
    if world == 1:
        return Check("collectives", OK, "one process: nothing to exchange"), {"world_size": 1}
    failed = _exchange_is_correct(accelerator)
    if failed:
        return failed, {"world_size": world}
    t = _timings(accelerator, hidden_sizes, global_batch)
    bus = 2 * (world - 1) / world * t["numel"] * 4 / t["allreduce"]  # bytes/s each link carries in a ring
    speedup = t["alone"] / (t["shared"] + t["allreduce"])
    figures = {
        "world_size": world,
        "backend": torch.distributed.get_backend(),
        "gradient_floats": t["numel"],
        "latency_ms": 1e3 * t["latency"],
        "allreduce_ms": 1e3 * t["allreduce"],
        "bus_gb_per_s": bus / 1e9,
        "step_ms_one_process": 1e3 * t["alone"],
        "step_ms_per_process": 1e3 * t["shared"],
        "estimated_speedup": speedup,
    }
    verdict = "faster than one" if speedup > 1 else "slower than one: communication outweighs compute"
    return Check(
        "collectives",
        OK,
        (
            f"all-reduce and all-gather correct ({figures['backend']}); latency {figures['latency_ms']:.2f} ms; "
            f"gradient ({t['numel']:,} floats) all-reduce {figures['allreduce_ms']:.2f} ms ({bus / 1e9:.2f} GB/s bus); "
            f"a step computes in {figures['step_ms_per_process']:.2f} ms per process vs "
            f"{figures['step_ms_one_process']:.2f} ms on one: {world} processes ~{speedup:.2f}x one ({verdict})"
        ),
    ), figures
