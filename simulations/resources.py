"""How many simulation workers run at once, and what each gets.

A worker is one Ray actor: it keeps the base model (quantized) with LoRA attached resident and
trains one virtual client at a time, loading that client's adapter into the resident LoRA
modules in place (``client/app.py``: ``get_runtime`` caches the model per process; the global
adapter of each message is loaded into it). Flower starts ``floor(cluster CPUs / cpus per
worker)`` of them (fewer when GPUs are the limit).
"""

from __future__ import annotations

from dataclasses import dataclass

# torch's CPU kernels for a small model stop speeding up past a few threads; beyond that, more
# workers (clients in parallel) use the cores better.
CORES_PER_WORKER = 4


@dataclass(frozen=True)
class WorkerResources:
    cpus: float  # Ray num_cpus of each worker
    gpus: float  # Ray num_gpus of each worker (a fraction: several workers share a GPU)
    workers: int  # how many fit on this machine (a cluster may fit more)
    threads: int  # torch threads of each worker

    def client_resources(self) -> dict[str, float]:
        """Flower's ``backend_config["client_resources"]``."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus}


def worker_resources(
    cpus: int, gpus: int, cpus_per_client: float = 0.0, gpus_per_client: float = 0.0
) -> WorkerResources:
    """Resources per worker for a machine with ``cpus`` cores and ``gpus`` GPUs.

    Given values are kept. Without ``cpus_per_client``: on CPU, one worker per
    ``CORES_PER_WORKER`` cores (at least one, which then gets all cores); with GPUs, the cores
    are shared among the workers the GPUs hold (``gpus / gpus_per_client``).

    >>> worker_resources(2, 0)
    WorkerResources(cpus=2.0, gpus=0.0, workers=1, threads=2)
    >>> worker_resources(16, 0)
    WorkerResources(cpus=4.0, gpus=0.0, workers=4, threads=4)
    >>> worker_resources(16, 1, gpus_per_client=0.25)
    WorkerResources(cpus=4.0, gpus=0.25, workers=4, threads=4)
    """
    if cpus < 1:
        raise ValueError(f"cpus: must be >= 1, got {cpus}")
    if cpus_per_client < 0 or gpus_per_client < 0:
        raise ValueError("cpus-per-client and gpus-per-client must be >= 0")
    if gpus_per_client > 0 and gpus == 0:
        raise ValueError(f"gpus-per-client: {gpus_per_client} asked for, but no GPU was found")
    if cpus_per_client:
        per_cpu = cpus_per_client
    elif gpus_per_client:
        per_cpu = max(1.0, float(cpus // max(1, int(gpus / gpus_per_client))))
    else:
        per_cpu = float(cpus // max(1, cpus // CORES_PER_WORKER))
    workers = max(1, int(cpus // per_cpu)) if per_cpu <= cpus else 0
    if gpus_per_client:
        workers = min(workers, int(gpus / gpus_per_client + 1e-9))
    return WorkerResources(
        cpus=per_cpu, gpus=gpus_per_client, workers=workers, threads=max(1, int(per_cpu))
    )
