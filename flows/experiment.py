"""The experiments as Prefect flows: one flow per experiment, each training a task run.

A training waits only for the soft targets of its own guides, so independent trainings (the
seeds, the sizes of a sweep) run concurrently on the flow's task runner: threads here, or a
Dask cluster (prefect-dask) that `KD_DASK_ADDRESS` or `--dask-address` names. The trainings
are seeded and write to content-addressed folders, so any runner gives the same models
(flows/runners.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from engine.device import resolve_device
from experiments.plans import Plan, build_plan
from experiments.report import report_experiment
from flows.runners import DEFAULT_WORKERS, GPU_TAG, WORKERS, slot, task_runner
from tasks import tracking
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.stages import run_stage
from tasks.train_job import Job, cache_job, describe, job_id, train_job

def _join_parent(parent: str | None) -> None:
    """Worker processes (Dask) do not inherit the flow's environment: the parent run comes as an argument."""
    if parent:
        os.environ[tracking.ENV_PARENT] = parent


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def train(job: Job, config: PipelineConfig, root: str, parent: str | None, threads: int, workers: int) -> dict:
    _join_parent(parent)
    # The CPU's float sums depend on the thread count; Dask starts workers with one thread.
    torch.set_num_threads(threads)
    with slot(workers):
        return train_job(config, Catalog(Path(root)), job)


@task(retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def cache(job: Job, config: PipelineConfig, root: str, threads: int, workers: int) -> dict:
    torch.set_num_threads(threads)
    with slot(workers):
        return cache_job(config, Catalog(Path(root)), job)


def submit_plan(plan: Plan, cfg: PipelineConfig, root: str, parent: str | None, workers: int, variant: str = "*",
                seed: int | None = None) -> dict[str, PrefectFuture]:
    """Submit every training the selected rows need, each once, after its guides' soft targets."""
    threads = torch.get_num_threads()
    tags = [GPU_TAG] if resolve_device(cfg.device).type == "cuda" else []
    trains: dict[str, PrefectFuture] = {}
    caches: dict[str, PrefectFuture] = {}

    def submit_train(job: Job) -> PrefectFuture:
        jid = job_id(cfg, job)
        if jid not in trains:
            deps = [submit_cache(g) for g in job.guides]
            named = train.with_options(task_run_name=describe(cfg, job), tags=tags)
            trains[jid] = named.submit(job, cfg, root, parent, threads, workers, wait_for=deps)
        return trains[jid]

    def submit_cache(job: Job) -> PrefectFuture:
        jid = job_id(cfg, job)
        if jid not in caches:
            title = f"cache soft targets of {job.role} {job.arch} s{job.seed}"
            named = cache.with_options(task_run_name=title, tags=tags)
            caches[jid] = named.submit(job, cfg, root, threads, workers, wait_for=[submit_train(job)])
        return caches[jid]

    for row in plan.select(variant, seed):
        submit_train(row.job)
    return trains


def run_experiment(name: str, config: PipelineConfig, variant: str = "*", seed: Optional[int] = None,
                   workers: int = DEFAULT_WORKERS) -> dict:
    """The body every experiment flow shares: plan, trainings, then the report when the whole plan ran."""
    cat, config = Catalog.default(), tracking.for_experiments(config)
    plan = build_plan(name, config)
    os.environ[tracking.ENV_FLOW_RUN] = str(flow_run.get_id() or "")
    parent = tracking.start_parent(config, cat, "prefect", f"experiment {name} ({config.data.name})", "experiment")
    try:
        run_stage("prepare-data", config, cat)
        futures = submit_plan(plan, config, str(cat.root), parent, workers, variant, seed)
        results = {jid: f.result() for jid, f in futures.items()}
        whole = variant == "*" and seed is None
        report = report_experiment(plan, config, cat, results) if whole else None
    except BaseException:
        tracking.end_parent(cat, "FAILED")
        raise
    tracking.end_parent(cat)
    trained = sorted(jid for jid, r in results.items() if not r.get("reused"))
    get_run_logger().info("%s: %d trainings, %d new", name, len(results), len(trained))
    return {"experiment": name, "trained": trained, "reused": len(results) - len(trained),
            "report": str(cat.experiment(name) / "report") if report else None,
            "means": report["means"] if report else None, "contrasts": report["contrasts"] if report else None}


# One flow per experiment, each a plain `def` so `prefect deploy` finds it by name. `variant`
# (a glob) and `seed` run part of a plan; the report is written when the whole plan ran.


@flow(name="takd-comparison", log_prints=True, task_runner=task_runner())
def comparison(config: PipelineConfig = PipelineConfig(), variant: str = "*", seed: Optional[int] = None,
               workers: int = WORKERS) -> dict:
    """NOKD / BLKD / TAKD over student.seeds, with paired confidence intervals."""
    return run_experiment("comparison", config, variant, seed, workers)


@flow(name="takd-ta-sweep", log_prints=True, task_runner=task_runner())
def ta_sweep(config: PipelineConfig = PipelineConfig(), variant: str = "*", seed: Optional[int] = None,
               workers: int = WORKERS) -> dict:
    """Every TA size between teacher and student, and the paper's rule of thumb."""
    return run_experiment("ta-sweep", config, variant, seed, workers)


@flow(name="takd-teacher-sweep", log_prints=True, task_runner=task_runner())
def teacher_sweep(config: PipelineConfig = PipelineConfig(), variant: str = "*", seed: Optional[int] = None,
               workers: int = WORKERS) -> dict:
    """Student accuracy against teacher size, student fixed."""
    return run_experiment("teacher-sweep", config, variant, seed, workers)


@flow(name="takd-student-sweep", log_prints=True, task_runner=task_runner())
def student_sweep(config: PipelineConfig = PipelineConfig(), variant: str = "*", seed: Optional[int] = None,
               workers: int = WORKERS) -> dict:
    """KD gain over NOKD against student size, teacher fixed."""
    return run_experiment("student-sweep", config, variant, seed, workers)


@flow(name="takd-paths", log_prints=True, task_runner=task_runner())
def paths(config: PipelineConfig = PipelineConfig(), variant: str = "*", seed: Optional[int] = None,
               workers: int = WORKERS) -> dict:
    """All 2^n distillation paths through experiments.path_sizes, and DGKD."""
    return run_experiment("paths", config, variant, seed, workers)


@flow(name="takd-equal-compute", log_prints=True, task_runner=task_runner())
def equal_compute(config: PipelineConfig = PipelineConfig(), variant: str = "*", seed: Optional[int] = None,
               workers: int = WORKERS) -> dict:
    """E epochs from labels against E/2 teacher + E/2 distillation; born-again generations."""
    return run_experiment("equal-compute", config, variant, seed, workers)


@flow(name="takd-methods", log_prints=True, task_runner=task_runner())
def methods(config: PipelineConfig = PipelineConfig(), variant: str = "*", seed: Optional[int] = None,
               workers: int = WORKERS) -> dict:
    """FitNets, AT, RKD, SP, DKD, DML, born-again, self-distillation and ensembles beside KD and TAKD."""
    return run_experiment("methods", config, variant, seed, workers)


FLOWS = {"comparison": comparison, "ta-sweep": ta_sweep, "teacher-sweep": teacher_sweep,
         "student-sweep": student_sweep, "paths": paths, "equal-compute": equal_compute, "methods": methods}
