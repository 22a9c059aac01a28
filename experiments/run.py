"""Run a plan's trainings in this process, one after another (DVC stages and the reference
for 'concurrent runs give the same models')."""
from __future__ import annotations

from experiments.analysis import Results
from experiments.plans import Plan
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.stages import run_stage
from tasks.train_job import all_jobs, train_job


def run_rows(plan: Plan, cfg: PipelineConfig, cat: Catalog, variant: str = "*", seed: int | None = None) -> Results:
    run_stage("prepare-data", cfg, cat)  # reused when the data and its config are unchanged
    jobs = all_jobs(cfg, [r.job for r in plan.select(variant, seed)])
    return {jid: train_job(cfg, cat, job) for jid, job in jobs.items()}
