"""Trainings and soft-target caches, each run once: the runner the pipeline's stages and the experiments share.

`spec()` turns the configuration into a TrainSpec (engine/spec.py); the stage table (tasks/stages.py) and the
experiments' plans (experiments/plans.py) both build theirs with it. `training()` and `caching()` make each a
piece of work for `run_once` (tasks/stage.py) under one key scheme: what decides the outputs (the spec's identity, or the cache's settings), the
content of the files it reads and of the outputs it learns from, and its code. So a pipeline stage, an experiment
and the CLI find the same work done, and a cache is made once for every setting it does not depend on.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from engine.config import KDConfig, TrainConfig
from engine.distill import Folders, Hooks, run, write_cache
from engine.distributed import ranks
from engine.errors import KDError
from engine.losses import LOSSES
from engine.spec import CacheSpec, GuideUse, Imported, Role, TrainSpec
from engine.workspace import Workspace
from tasks import tracking
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.content import content_hash
from tasks.run_context import RunContext
from tasks.stage import Work, read_stage, run_once

CODE = ("tasks/train.py", "tasks/tracking.py")
log = logging.getLogger("kd")
CACHE_CODE = ("tasks/train.py",)


def recipe(cfg: PipelineConfig, role: Role, **update) -> TrainConfig:
    """The role's training settings, with `update`'s values (None: keep)."""
    base = getattr(cfg, role).train
    update = {k: v for k, v in update.items() if v is not None}
    return base.model_copy(update=update) if update else base


def use(cfg: PipelineConfig) -> GuideUse:
    return GuideUse(**{k: getattr(cfg.cache, k) for k in GuideUse.model_fields})


def spec(cfg: PipelineConfig, role: Role, arch: str, seed: int, *, train: TrainConfig, kd: KDConfig | None = None,
         guides: tuple[TrainSpec, ...] = (), reading: GuideUse | None = None, **kw) -> TrainSpec:
    """A TrainSpec from the configuration: `kd` None learns from labels only; guides are read as `reading` says,
    else as cfg.cache says."""
    return TrainSpec(role=role, arch=arch, seed=seed, train=train, loss=kd.loss if kd else "ce", kd=kd,
                     guides=tuple(guides), use=(reading or use(cfg)) if guides else None, **kw)


def hop_kd(cfg: PipelineConfig, role: Role) -> KDConfig:
    """The distillation settings of the hop into a model of `role`: its own, or the top-level kd."""
    return getattr(cfg, role).kd or cfg.kd


def method(s: TrainSpec) -> str:
    """What a training is called by its loss: 'NOKD', 'KD', 'DGKD', 'DKD + LS', 'FitNets'..."""
    if s.loss == "ce":
        return "teacher" if s.role == "teacher" else "NOKD"
    ls = " + LS" if LOSSES[s.loss].standardizes and s.kd.standardize else ""  # logit standardization
    if s.loss == "kd":
        return ("KD" if len(s.guides) == 1 else "DGKD" if s.survival < 1 else "ensemble KD") + ls
    return {"fitnets": "FitNets", "self": "self-distillation", "reviewkd": "ReviewKD"}.get(s.loss, s.loss.upper()) + ls


def imported(cfg: PipelineConfig) -> Imported | None:
    t = cfg.teacher
    if not (t.checkpoint or t.predictions):
        return None
    return Imported(checkpoint=t.checkpoint, format=t.format, predictions=t.predictions,
                    predictions_kind=t.predictions_kind, predictions_temperature=t.predictions_temperature)


# ---------------------------------------------------------------- keys

def _upstream(spec: TrainSpec, cat: Catalog) -> list[Path]:
    """The outputs a training reads: the prepared data, each guide's model and (read from a cache) soft targets,
    its start."""
    guides = [cat.root / g.out for g in spec.guides] + [cat.root / g.targets for g in spec.cached_guides()]
    return [cat.prepared, *guides, *([cat.root / spec.init.out] if spec.init else [])]


def key_inputs(what: dict, reads: list[Path], upstream: list[Path], cat: Catalog, who: str) -> dict:
    """What a key hashes beside the code: what decides the outputs, and the content of every file read and every
    upstream output (each must be finished: its stage.json written last)."""
    for folder in upstream:
        if read_stage(folder) is None:
            raise KDError(f"{_rel(folder, cat)}: {who} reads it, but it has not been produced yet (no stage.json); "
                          "run the stage that makes it first")
    return {"what": what, "reads": {str(p): content_hash(p, cat.state) for p in reads},
            "upstream": {_rel(p, cat): content_hash(p, cat.state) for p in upstream}}


def _rel(path: Path, cat: Catalog) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(cat.root)) if path.is_relative_to(cat.root) else str(path)


# ---------------------------------------------------------------- running them

def _logged(s: TrainSpec, hooks: Hooks) -> Hooks:
    """Each epoch as a log line too: what a flow's task and `dvc repro` show while a training runs."""
    def epoch(m: dict) -> None:
        if m.get("epoch"):
            log.info("%s: epoch %d/%d, loss %.4f, train acc %.4f, val acc %.4f, %.0f img/s", s.name, m["epoch"],
                     s.train.epochs, m["loss_total"], m["train_acc"], m["val_acc"], m["images_per_second"])
        hooks.epoch(m)

    return replace(hooks, epoch=epoch)


def training(s: TrainSpec, cfg: PipelineConfig, cat: Catalog, ctx: RunContext, name: str | None = None) -> Work:
    """Training (or importing) `s` into its folder, as a piece of work with its key."""
    name = name or f"train-{s.name}"

    def make(key: str, staging: Path) -> dict:
        ws = Workspace(cat.prepared, cfg.device, cfg.data)
        folders = Folders(cat.root, cat.work(s.name), staging)
        if not ranks().main:  # one of several processes: rank 0 tracks and saves
            return run(s, ws, folders, key)
        with tracking.model_run(ctx, cfg, s, cat.prepared) as mlflow_run:
            result = run(s, ws, folders, key, _logged(s, mlflow_run.hooks))
        shutil.rmtree(folders.work, ignore_errors=True)  # epoch checkpoints are no longer needed
        return {**result, "mlflow_run_id": mlflow_run.run_id}

    reads = [Path(s.imported.file)] if s.imported else []
    return Work(name, cat.root / s.out, key_inputs(s.identity(), reads, _upstream(s, cat), cat, name), CODE, make)


def caching(s: TrainSpec, made: CacheSpec, cfg: PipelineConfig, cat: Catalog, name: str | None = None) -> Work:
    """The soft targets of the trained `s` over the views `made` describes, into `s.targets`."""
    name = name or f"cache-{s.name}"
    model_dir = cat.root / s.out

    def make(key: str, staging: Path) -> dict:
        return write_cache(Workspace(cat.prepared, cfg.device, cfg.data), model_dir, made, staging, cfg.cache.batch_size)

    inputs = key_inputs(made.model_dump(), [], [cat.prepared, model_dir], cat, name)
    return Work(name, cat.root / s.targets, inputs, CACHE_CODE, make)


def train_here(s: TrainSpec, cfg: PipelineConfig, cat: Catalog, ctx: RunContext | None = None,
               force: bool = False) -> dict:
    """Train `s` in this process, after what it learns from (each training and cache reused when up to date);
    its summary. For scripts and notebooks: the flows and DVC stages launch each training in a process of its own."""
    ctx = ctx or RunContext.resolve(cat.root)
    for t in s.lineage():  # upstream first: each guide is trained before its cache and its readers
        for g in t.cached_guides():
            run_once(cat, caching(g, t.use.cache(), cfg, cat))  # as the reader reads it, into its folder
        result = run_once(cat, training(t, cfg, cat, ctx), force and t is s)
    return result
