"""Stage prepare-data: load the data set by name, carve the validation split, store it."""
from __future__ import annotations

from engine.atomic import save_torch
from engine.data import load_splits
from engine.workspace import DATASET_FILE
from tasks.stage import StageRun


def work(run: StageRun) -> dict:
    splits = load_splits(run.cfg.data)
    save_torch(splits.to_dict(), run.out / DATASET_FILE)
    mean, std = splits.mean_std()
    return {"name": splits.name, "classes": splits.classes, "fingerprint": splits.fingerprint(),
            "sizes": {s: len(getattr(splits, s)) for s in ("train", "val", "test")},
            "input_shape": list(splits.input_shape), "mean": mean, "std": std, "augment": splits.augment.model_dump()}
