"""Stage cache-soft-targets: run a trained teacher (or assistant) once over the training set."""
from __future__ import annotations

from pathlib import Path

from engine import soft_targets
from engine.fingerprint import model_fingerprint
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.context import Workspace
from tasks.stage import run_once, stage_key


def cache_soft_targets(cfg: PipelineConfig, cat: Catalog, source: str, force: bool = False) -> dict:
    return cache_model(cfg, cat, cat.model(source), cat.soft_targets(source), f"cache-{source}", source, force)


def cache_model(cfg: PipelineConfig, cat: Catalog, model_dir: Path, out_dir: Path, stage: str, what: str,
                force: bool = False) -> dict:
    """Soft targets of the model in `model_dir`, written to `out_dir`."""
    inputs = {"model": stage_key(model_dir, what), "data": stage_key(cat.prepared, "the prepared data set"),
              "cache": cfg.cache.model_dump(exclude={"online", "batch_size"})}

    def work(key: str, staging: Path) -> dict:
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

    return run_once(cat, stage, "cache", out_dir, inputs, work, force)
