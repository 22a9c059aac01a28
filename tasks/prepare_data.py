"""Stage prepare-data: load the data set by name, carve the validation split, store it (engine/store.py)."""
from __future__ import annotations

from engine.data import load_splits
from tasks.stage import StageRun


def work(run: StageRun) -> dict:
    splits = load_splits(run.cfg.data, decode=False)  # a folder of images is decoded as it is stored
    manifest = splits.write(run.out)
    return {"name": splits.name, "classes": splits.classes, "fingerprint": manifest["fingerprint"],
            "sizes": {s: len(getattr(splits, s)) for s in ("train", "val", "test")},
            "input_shape": list(splits.input_shape), "mean": manifest["mean"], "std": manifest["std"],
            "augment": splits.augment.model_dump()}
