"""Stage cache-soft-targets: run a trained teacher (or assistant) once over the training set."""
from __future__ import annotations

from pathlib import Path

from engine import soft_targets
from engine.fingerprint import model_fingerprint
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.context import Workspace
from tasks.stage import StageRun


def write_cache(cfg: PipelineConfig, cat: Catalog, model_dir: Path, staging: Path) -> dict:
    """Soft targets of the model in `model_dir`, written to `staging`."""
    ws = Workspace(cat, cfg.device)
    model = ws.load_model_dir(model_dir)
    spec = ws.splits.augment
    targets = soft_targets.compute(model, ws.train, spec, cfg.cache.views, cfg.cache.seed, cfg.cache.topk,
                                   cfg.cache.batch_size)
    cache_key = soft_targets.CacheKey(model_fingerprint(model), ws.fingerprint, spec.model_dump(), cfg.cache.views,
                                      cfg.cache.seed, cfg.cache.topk, ws.splits.num_classes, len(ws.train))
    soft_targets.save(staging, targets, cache_key)
    manifest = soft_targets.read_manifest(staging)
    return {"views": cfg.cache.views, "topk": cfg.cache.topk, "bytes": manifest["bytes"], "shape": manifest["shape"]}


def cache_stage(source: str):
    """The work of the stage that caches the pipeline model `source`."""
    def work(run: StageRun) -> dict:
        return write_cache(run.cfg, run.cat, run.cat.model(source), run.out)

    return work
