"""The TAKD pipeline as a Prefect flow: the stage table's instances as a DAG of task runs.

Each stage instance is a task run named for what it does, submitted with `wait_for` its own
upstream only, so independent stages run at once on the flow's task runner (threads, or Dask:
flows/runners.py): the NOKD students train while the teacher does. The flow only wires stages
together; the work is in tasks/. Its parameter is the pipeline config, so the Prefect UI shows
the schema as a form.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run

from engine.device import resolve_device
from flows.dvc_sync import sync_dvc_lock
from flows.runners import GPU_TAG, WORKERS, slot, task_runner
from tasks import tracking
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.stages import STAGES, Instance, instances, run_instance, upstream

@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def run_stage(stage: str, seed: Optional[int], config: PipelineConfig, root: str, parent: Optional[str],
              threads: int, workers: int, force: bool = False) -> dict:
    """A retry resumes training from the stage's last epoch checkpoint (data/work/)."""
    if parent:  # a Dask worker process does not inherit the flow's environment
        os.environ[tracking.ENV_PARENT] = parent
    torch.set_num_threads(threads)
    with slot(workers):
        return run_instance(Instance(STAGES[stage], seed), config, Catalog(Path(root)), force)


def tags(inst: Instance, config: PipelineConfig) -> list[str]:
    """The `gpu` tag, whose concurrency limit keeps two stages off one GPU, on accelerator stages on a GPU only."""
    return [GPU_TAG] if inst.stage.accelerator and resolve_device(config.device).type == "cuda" else []


@flow(name="takd-pipeline", log_prints=True, task_runner=task_runner())
def takd_pipeline(config: PipelineConfig = PipelineConfig(), force: bool = False,
                  workers: int = WORKERS) -> dict:
    """prepare-data -> teacher -> soft targets -> assistant -> soft targets -> students over the seeds
    (NOKD, BLKD, TAKD) -> fine-tune -> evaluate -> report -> export."""
    cat = Catalog.default()
    os.environ[tracking.ENV_FLOW_RUN] = str(flow_run.get_id() or "")
    parent = tracking.start_parent(config, cat, "prefect")
    futures = {}
    for inst in instances(config):
        named = run_stage.with_options(name=inst.stage.name, task_run_name=inst.title(config), tags=tags(inst, config))
        futures[inst.id] = named.submit(inst.stage.name, inst.seed, config, str(cat.root), parent,
                                        torch.get_num_threads(), workers, force,
                                        wait_for=[futures[u.id] for u in upstream(inst, config)])
    wait(list(futures.values()))
    try:
        results = {i: f.result() for i, f in futures.items()}
    except BaseException:
        tracking.end_parent(cat, "FAILED")
        raise
    tracking.end_parent(cat)
    synced = sync_dvc_lock(config, cat)
    get_run_logger().info("dvc.lock %s", "updated: dvc status is clean" if synced else "left alone (not the params.yaml config)")
    report = results["report"]
    return {"means": report["means"], "contrasts": report["contrasts"], "exported": results["export"]["model"],
            "reused": [i for i, r in results.items() if r.get("reused")]}
