"""Workers per machine and resources per worker (simulations/resources.py)."""

from __future__ import annotations

import pytest

from simulations.resources import WorkerResources, worker_resources


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1, 0), WorkerResources(cpus=1.0, gpus=0.0, workers=1, threads=1)),
        ((2, 0), WorkerResources(cpus=2.0, gpus=0.0, workers=1, threads=2)),
        ((8, 0), WorkerResources(cpus=4.0, gpus=0.0, workers=2, threads=4)),
        ((16, 0), WorkerResources(cpus=4.0, gpus=0.0, workers=4, threads=4)),
        ((16, 0, 1.0), WorkerResources(cpus=1.0, gpus=0.0, workers=16, threads=1)),
        ((16, 0, 3.0), WorkerResources(cpus=3.0, gpus=0.0, workers=5, threads=3)),
        ((2, 0, 4.0), WorkerResources(cpus=4.0, gpus=0.0, workers=0, threads=4)),
        # One GPU shared by four workers; the 16 cores split among them.
        ((16, 1, 0.0, 0.25), WorkerResources(cpus=4.0, gpus=0.25, workers=4, threads=4)),
        # Two GPUs, one worker each; 2 cores each given, so the GPUs are the limit.
        ((16, 2, 2.0, 1.0), WorkerResources(cpus=2.0, gpus=1.0, workers=2, threads=2)),
    ],
)
def test_worker_resources(args: tuple[float, ...], expected: WorkerResources) -> None:
    assert worker_resources(*args) == expected  # type: ignore[arg-type]


def test_gpus_asked_for_without_a_gpu_are_refused() -> None:
    with pytest.raises(ValueError, match=r"gpus-per-client: 0\.5 asked for, but no GPU was found"):
        worker_resources(8, 0, gpus_per_client=0.5)
    assert worker_resources(8, 0).client_resources() == {"num_cpus": 4.0, "num_gpus": 0.0}
