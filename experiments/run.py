"""An experiment's steps: its prepared data, each training and each guide's soft-target cache, in order, each
training and cache in a process of its own (`python -m experiments train|cache NAME --job ID`). The DVC matrix
stages and the report command run them one after another here; the Prefect flow (flows/experiment.py) submits
the same commands as tasks."""
from __future__ import annotations

from pathlib import Path

from engine.errors import KDError
from engine.spec import TrainSpec
from experiments.analysis import Results
from experiments.plans import Plan
from tasks import tracking, train as training
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.launch import launch
from tasks.run_context import RunContext
from tasks.stage import Work
from tasks.stages import run_stage

TRAIN, CACHE = "train", "cache"


def steps(plan: Plan, variant: str = "*", seed: int | None = None) -> list[tuple[str, TrainSpec]]:
    """(TRAIN or CACHE, spec) for every training the selected rows need, each guide's cache before its first
    student, in an order where each step comes after what it reads."""
    out: dict[tuple[str, str], TrainSpec] = {}
    for s in plan.trainings(variant, seed).values():
        for g in s.guides:
            out.setdefault((CACHE, g.id), g)
        out.setdefault((TRAIN, s.id), s)
    return [(kind, s) for (kind, _), s in out.items()]


def command(kind: str, plan: Plan, s: TrainSpec, params: Path) -> list[str]:
    """The step's command after `python -m`."""
    return ["experiments", kind, plan.name, "--job", s.id, "--params", str(params)]


def needs(kind: str, s: TrainSpec) -> list[tuple[str, str]]:
    """The steps it reads: a cache its training; a training its guides' caches and its start."""
    if kind == CACHE:
        return [(TRAIN, s.id)]
    return [(CACHE, g.id) for g in s.guides] + ([(TRAIN, s.init.id)] if s.init else [])


def work(kind: str, s: TrainSpec, cfg: PipelineConfig, cat: Catalog, ctx: RunContext) -> Work:
    if kind == TRAIN:
        return training.training(s, cfg, cat, ctx, f"train-{s.id}")
    return training.caching(s, training.use(cfg).cache(), cfg, cat, f"cache-{s.id}")


def done(kind: str, s: TrainSpec, cfg: PipelineConfig, cat: Catalog, ctx: RunContext) -> dict | None:
    """Its recorded summary when it is up to date; None when its command must run."""
    try:
        return work(kind, s, cfg, cat, ctx).done()
    except KDError:  # an upstream output is missing: the command will say so
        return None


def run_rows(plan: Plan, cfg: PipelineConfig, cat: Catalog, ctx: RunContext, params: Path, variant: str = "*",
             seed: int | None = None) -> Results:
    """The selected rows' trainings, each launched in a process of its own unless up to date; their summaries by id."""
    run_stage("prepare-data", cfg, cat, ctx=ctx)  # reused when the data and its config are unchanged
    ctx = ctx.under(tracking.parent_of(ctx, cfg))  # under `dvc repro`, the repro's parent run, found once here
    results: Results = {}
    for kind, s in steps(plan, variant, seed):
        found = done(kind, s, cfg, cat, ctx)
        result = {**found, "reused": True} if found is not None else launch(command(kind, plan, s, params), ctx)
        if kind == TRAIN:
            results[s.id] = result
    return results
