"""Stage cache-soft-targets: run a trained teacher (or assistant) once over the training set."""
from __future__ import annotations

from pathlib import Path

from engine import soft_targets
from engine.atomic import load_torch
from engine.errors import KDError
from engine.fingerprint import model_fingerprint
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.context import PREDICTIONS_FILE, Workspace, read_meta
from tasks.stage import StageRun


def _from_predictions(cfg: PipelineConfig, model_dir: Path):
    """A teacher known only by its outputs on the clean images: one view, nothing to run."""
    if cfg.cache.views != 1:
        raise KDError(f"{model_dir}: the teacher is known only by its predictions on the clean training images "
                      f"(teacher.predictions), which make one view; set cache.views: 1 (it is {cfg.cache.views})")
    return soft_targets.from_logits(load_torch(model_dir / PREDICTIONS_FILE), cfg.cache.topk)


def write_cache(cfg: PipelineConfig, cat: Catalog, model_dir: Path, staging: Path) -> dict:
    """Soft targets of the model in `model_dir`, written to `staging`."""
    ws = Workspace(cat, cfg.device)
    model = ws.load_guide(model_dir)
    spec = ws.splits.augment
    if model is None:
        targets, fingerprint = _from_predictions(cfg, model_dir), read_meta(model_dir)["model_fingerprint"]
    else:
        targets = soft_targets.compute(model, ws.train, spec, cfg.cache.views, cfg.cache.seed, cfg.cache.topk,
                                       cfg.cache.batch_size)
        fingerprint = model_fingerprint(model)
    cache_key = soft_targets.CacheKey(fingerprint, ws.fingerprint, spec.model_dump(), cfg.cache.views,
                                      cfg.cache.seed, cfg.cache.topk, ws.splits.num_classes, len(ws.train))
    soft_targets.save(staging, targets, cache_key)
    manifest = soft_targets.read_manifest(staging)
    return {"views": cfg.cache.views, "topk": cfg.cache.topk, "bytes": manifest["bytes"], "shape": manifest["shape"]}


def cache_stage(source: str):
    """The work of the stage that caches the pipeline model `source`."""
    def work(run: StageRun) -> dict:
        return write_cache(run.cfg, run.cat, run.cat.model(source), run.out)

    return work
