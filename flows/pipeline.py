"""The TAKD pipeline as a Prefect flow: every stage is a task run named for what it does.

The flow only wires stages together; the work is in tasks/. Its one parameter is the
pipeline config, so the Prefect UI shows the schema as a form.
"""
from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.dvc_sync import sync_dvc_lock
from tasks import tracking
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.stages import STAGES, title, uses_accelerator

GPU_TAG = "gpu"  # `prefect concurrency-limit create gpu 1`: two GPU stages never share a GPU


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def run_stage(stage: str, config: PipelineConfig, force: bool = False) -> dict:
    """A retry resumes training from the stage's last epoch checkpoint (data/work/)."""
    return STAGES[stage](config, Catalog.default(), force)


@flow(name="takd-pipeline", log_prints=True)
def takd_pipeline(config: PipelineConfig = PipelineConfig(), force: bool = False) -> dict:
    """prepare-data -> teacher -> soft targets -> assistant -> soft targets -> students
    (NOKD, BLKD, TAKD) -> fine-tune -> evaluate -> report."""
    cat = Catalog.default()
    os.environ[tracking.ENV_FLOW_RUN] = str(flow_run.get_id() or "")
    tracking.start_parent(config, cat, "prefect")
    results = {}
    try:
        for stage in STAGES:
            tags = [GPU_TAG] if uses_accelerator(stage) else []
            named = run_stage.with_options(name=stage, task_run_name=title(config, stage), tags=tags)
            results[stage] = named(stage, config, force)
    except BaseException:
        tracking.end_parent(cat, "FAILED")
        raise
    tracking.end_parent(cat)
    synced = sync_dvc_lock(config, cat)
    get_run_logger().info("dvc.lock %s", "updated: dvc status is clean" if synced else "left alone (not the params.yaml config)")
    return {"test_acc": results["report"]["test_acc"], "reused": [s for s, r in results.items() if r.get("reused")]}
