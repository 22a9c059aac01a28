"""The task runner a flow runs its tasks on: threads here, or a Dask cluster (prefect-dask).

On threads, every submitted task gets a thread at once, because a task waiting for its upstream
holds its thread while it waits; `slot` then lets at most `workers` of them do their work at a
time, so waiting stages never keep a ready one from starting. Stages and trainings are seeded
and write to their own folders, so any runner gives the same models; on the CPU a task sets the
thread count of the process that submitted it, because float sums depend on it and Dask starts
its workers with one thread.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

from prefect.task_runners import ThreadPoolTaskRunner

from pydantic import Field

ENV_WORKERS, ENV_DASK = "KD_WORKERS", "KD_DASK_ADDRESS"
DEFAULT_WORKERS = int(os.environ.get(ENV_WORKERS, "2"))
# A flow parameter, so the Prefect form offers it.
WORKERS = Field(DEFAULT_WORKERS, ge=1, description="stages or trainings that work at once, on threads")
GPU_TAG = "gpu"  # `prefect concurrency-limit create gpu 1`: two GPU tasks never share a GPU
_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def task_runner(dask_address: str | None = None, dask_workers: int = 0):
    """Threads; a Dask cluster when an address or a local worker count is given (or KD_DASK_ADDRESS is set)."""
    address = dask_address or os.environ.get(ENV_DASK)
    if address or dask_workers:
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        # One thread per worker process: each task owns its process, as it would own a GPU.
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"})
    return ThreadPoolTaskRunner()


@contextmanager
def slot(workers: int) -> Iterator[None]:
    """At most `workers` tasks of this process work at once."""
    with _SLOTS_LOCK:
        sem = _SLOTS.setdefault(workers, threading.BoundedSemaphore(workers))
    with sem:
        yield
