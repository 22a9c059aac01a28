"""How a flow runs its steps: one Prefect task per stage or training, which launches that step's own command in a
process of its own (tasks/launch.py), on threads here or on a Dask cluster (prefect-dask).

`run_graph` submits a step only once the steps it needs have finished, and at most `workers` at a time, so a step
waiting for its upstream never holds a worker while a ready one could start; a step whose upstream failed is not
submitted, and the first failure is raised once the running steps have finished.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.workers import DEFAULT_WORKERS  # the CLI reads it there, without Prefect (takd/cli.py)
from tasks.launch import launch
from tasks.run_context import RunContext

ENV_DASK = "KD_DASK_ADDRESS"
# A flow parameter, so the Prefect form offers it.
WORKERS = Field(DEFAULT_WORKERS, ge=1, description="stages or trainings that run at once, each in its own process")
GPU_TAG = "gpu"  # `prefect concurrency-limit create gpu 1`: two GPU tasks never share a GPU


def task_runner(dask_address: str | None = None, dask_workers: int = 0):
    """Threads; a Dask cluster when an address or a local worker count is given (or KD_DASK_ADDRESS is set)."""
    address = dask_address or os.environ.get(ENV_DASK)
    if address or dask_workers:
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"})
    return ThreadPoolTaskRunner()


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def step(argv: list[str], context: dict, done: Optional[Callable[[], Optional[dict]]] = None) -> dict:
    """One stage or training. Up to date (`done()` finds its record), it is reused here; otherwise its command
    runs in a new process, which a retry runs again, resuming from the last epoch checkpoint."""
    if done is not None and (found := done()) is not None:
        get_run_logger().info("outputs up to date; reused")
        return {**found, "reused": True}
    return launch(argv, RunContext(**context), get_run_logger().info)


@dataclass
class Node:
    """A step of a flow: its task's name and run name, its command, what it needs, and how to tell it is done."""

    name: str
    title: str
    argv: list[str]
    needs: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    done: Optional[Callable[[], Optional[dict]]] = None


def run_graph(nodes: dict[str, Node], ctx: RunContext, workers: int) -> dict[str, dict]:
    """Every node's result, by id; each submitted when what it needs has finished, at most `workers` at once."""
    context = ctx.public()  # not the store, which may carry credentials
    pending, running, futures, results = list(nodes), {}, {}, {}
    failed: list[tuple[str, BaseException]] = []
    while pending or running:
        for nid in [n for n in pending if all(u in results for u in nodes[n].needs)][: workers - len(running)]:
            node = nodes[nid]
            named = step.with_options(name=node.name, task_run_name=node.title, tags=node.tags)
            futures[nid] = running[nid] = named.submit(node.argv, context, node.done,
                                                        wait_for=[futures[u] for u in node.needs])
            pending.remove(nid)
        if not running:
            break  # what is left needs a step that failed
        finished = next(as_completed(list(running.values())))
        nid = next(n for n, f in running.items() if f is finished)
        del running[nid]
        try:
            results[nid] = finished.result()
        except BaseException as e:  # its dependents are never submitted; independent steps go on
            failed.append((nid, e))
    if failed:
        raise failed[0][1]
    return results
