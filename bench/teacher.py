"""Time to accuracy of the default teacher: the pipeline's teacher settings (params.yaml) trained once, with the
test accuracy recorded after every epoch (never used to select anything), and the wall time at which it first
reaches each target. The pipeline itself reads the test split only in its evaluate stage."""
from __future__ import annotations

import torch

from bench.common import Context
from engine.config import KDConfig
from engine.losses import build_loss
from engine.trainer import fit
from tasks.config import load_config

TARGETS = (0.92, 0.93, 0.935, 0.94)


def run(ctx: Context) -> dict:
    cfg = load_config(ctx.extra.get("params", "params.yaml")).teacher
    train_cfg = cfg.train.model_copy(update={"epochs": max(1, round(cfg.train.epochs * min(1.0, ctx.scale)))})
    model = ctx.model(cfg.arch, seed=cfg.seed)
    n = ctx.images(len(ctx.splits.train))
    result = fit(model, ctx.device_set("train", n), ctx.device_set("val"), train_cfg, build_loss("ce", KDConfig()),
                 torch.Generator().manual_seed(cfg.seed), ctx.splits.augment, test=ctx.device_set("test"))
    rows, elapsed = [], 0.0
    for h in result.history:
        elapsed += h["epoch_seconds"]
        rows.append({"epoch": h["epoch"], "seconds": round(elapsed, 1), "val_acc": h["val_acc"],
                     "test_acc": h["epoch_test_acc"]})
        ctx.log(f"  epoch {h['epoch']}: {elapsed:.0f} s, val {100 * h['val_acc']:.2f} %, "
                f"test {100 * h['epoch_test_acc']:.2f} %")
    reached = {f"seconds_to_{100 * t:g}": next((r["seconds"] for r in rows if r["test_acc"] >= t), None)
               for t in TARGETS}
    best = rows[result.best_epoch - 1]
    return {"rows": rows, "summary": {"arch": cfg.arch, "epochs": train_cfg.epochs, "train_images": n,
                                      "test_acc_at_best_val": best["test_acc"], "best_epoch": result.best_epoch,
                                      "train_seconds": rows[-1]["seconds"], **reached}}
