"""Stage prepare-data: load the data set by name, carve the validation split, store it."""
from __future__ import annotations

from pathlib import Path

from engine.atomic import save_torch
from engine.data import load_splits
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.context import DATASET_FILE
from tasks.stage import run_once


def prepare_data(cfg: PipelineConfig, cat: Catalog, force: bool = False) -> dict:
    def work(key: str, out: Path) -> dict:
        splits = load_splits(cfg.data)
        save_torch(splits.to_dict(), out / DATASET_FILE)
        mean, std = splits.mean_std()
        return {"name": splits.name, "classes": splits.classes, "fingerprint": splits.fingerprint(),
                "sizes": {s: len(getattr(splits, s)) for s in ("train", "val", "test")},
                "input_shape": list(splits.input_shape), "mean": mean, "std": std,
                "augment": splits.augment.model_dump()}

    # The source files are part of the key through the data config; their content through the fingerprint.
    return run_once(cat, "prepare-data", "prepare-data", cat.prepared, {"data": cfg.data.model_dump()}, work, force)
