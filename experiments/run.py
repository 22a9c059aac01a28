"""An experiment's steps: its prepared data, each training and each guide's soft-target cache, in order, each
training and cache in a process of its own (`python -m experiments train|cache NAME --job ID`). The DVC matrix
stages and the report command run them one after another here; the Prefect flow (flows/experiment.py) submits
the same commands as tasks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.errors import KDError
from engine.spec import CacheSpec, TrainSpec
from experiments.analysis import Results
from experiments.plans import DEFAULT_TARGETS, Plan
from tasks import tracking, train as training
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.launch import launch
from tasks.run_context import RunContext
from tasks.stage import Work
from tasks.stages import run_stage

TRAIN, CACHE = "train", "cache"


@dataclass(frozen=True)
class Step:
    """A training, or the soft-target cache a training reads: `made` says which views (the reader's GuideUse), and
    `spec.targets` where it goes. A cache's `job` is its guide's id, plus its folder's name where a plan reads
    that guide through more than one cache (experiments.plans.reading)."""

    kind: str
    job: str
    spec: TrainSpec
    made: Optional[CacheSpec] = None

    @property
    def node(self) -> str:
        return f"{self.kind}:{self.job}"


def _cache_step(g: TrainSpec, made: CacheSpec) -> Step:
    folder = Path(g.targets).name
    return Step(CACHE, g.id if folder == DEFAULT_TARGETS else f"{g.id}.{folder}", g, made)


def steps(plan: Plan, variant: str = "*", seed: int | None = None) -> list[Step]:
    """Every training the selected rows need and each cache they read, each cache before its first reader, in an
    order where each step comes after what it reads. A training that runs its guides online reads no cache."""
    out: dict[str, Step] = {}
    for s in plan.trainings(variant, seed).values():
        for g in s.cached_guides():
            step = _cache_step(g, s.use.cache())
            out.setdefault(step.node, step)
        out.setdefault(f"{TRAIN}:{s.id}", Step(TRAIN, s.id, s))
    return list(out.values())


def command(step: Step, plan: Plan, params: Path) -> list[str]:
    """The step's command after `python -m`."""
    return ["experiments", step.kind, plan.name, "--job", step.job, "--params", str(params)]


def needs(step: Step) -> list[str]:
    """The nodes it reads: a cache its training; a training its guides' caches (none online) and its start."""
    s = step.spec
    if step.kind == CACHE:
        return [f"{TRAIN}:{s.id}"]
    cached = s.cached_guides()
    guides = [_cache_step(g, s.use.cache()).node for g in cached] if cached else [f"{TRAIN}:{g.id}" for g in s.guides]
    return guides + ([f"{TRAIN}:{s.init.id}"] if s.init else [])


def work(step: Step, cfg: PipelineConfig, cat: Catalog, ctx: RunContext) -> Work:
    if step.kind == TRAIN:
        return training.training(step.spec, cfg, cat, ctx, f"train-{step.job}")
    return training.caching(step.spec, step.made, cfg, cat, f"cache-{step.job}")


def done(step: Step, cfg: PipelineConfig, cat: Catalog, ctx: RunContext) -> dict | None:
    """Its recorded summary when it is up to date; None when its command must run."""
    try:
        return work(step, cfg, cat, ctx).done()
    except KDError:  # an upstream output is missing: the command will say so
        return None


def run_rows(plan: Plan, cfg: PipelineConfig, cat: Catalog, ctx: RunContext, params: Path, variant: str = "*",
             seed: int | None = None) -> Results:
    """The selected rows' trainings, each launched in a process of its own unless up to date; their summaries by id."""
    run_stage("prepare-data", cfg, cat, ctx=ctx)  # reused when the data and its config are unchanged
    ctx = ctx.under(tracking.parent_of(ctx, cfg))  # under `dvc repro`, the repro's parent run, found once here
    results: Results = {}
    for step in steps(plan, variant, seed):
        found = done(step, cfg, cat, ctx)
        result = {**found, "reused": True} if found is not None else launch(command(step, plan, params), ctx)
        if step.kind == TRAIN:
            results[step.job] = result
    return results
