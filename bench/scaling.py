"""Epoch time against training-set size, and against model size.

Epoch time is the trainer's own per-epoch clock (the step loop, augmentation included,
validation excluded). Linear growth in the data shows as a straight-line fit with R^2
near 1 and a constant time per image.
"""
from __future__ import annotations

import statistics

import numpy as np

from bench.common import Context, run_fit
from models.profile import count_parameters, train_flops_per_image

FRACTIONS = [0.10, 0.25, 0.50, 1.00]
DATA_MODEL, BATCH = "plain-2", 128
MODELS = ["plain-2", "plain-4", "plain-6", "plain-8", "plain-10", "resnet-8", "resnet-20"]
MODEL_IMAGES = 8_000


def epoch_seconds(ctx: Context, arch: str, n: int) -> float:
    train, val = ctx.device_set("train", n), ctx.device_set("val", 16)

    def once() -> float:
        return run_fit(ctx, ctx.model(arch), train, val, batch=BATCH)[1].history[0]["epoch_seconds"]

    once()  # warm-up
    return statistics.median(once() for _ in range(ctx.repeats))


def data_sweep(ctx: Context) -> tuple[list[dict], dict]:
    full = ctx.images(len(ctx.splits.train))
    rows = []
    for frac in FRACTIONS:
        n = max(16, int(full * frac))
        s = epoch_seconds(ctx, DATA_MODEL, n)
        rows.append({"sweep": "data", "model": DATA_MODEL, "share": frac, "train_images": n, "epoch_s": s,
                     "us_per_image": s / n * 1e6})
        ctx.log(f"  {DATA_MODEL}, {n} images: {s:.2f} s/epoch")
    n, s = np.array([r["train_images"] for r in rows], float), np.array([r["epoch_s"] for r in rows])
    slope, intercept = np.polyfit(n, s, 1)
    r2 = 1 - ((s - (slope * n + intercept)) ** 2).sum() / ((s - s.mean()) ** 2).sum()
    per_image = [r["us_per_image"] for r in rows]
    return rows, {"linear_fit_us_per_image": slope * 1e6, "linear_fit_intercept_s": intercept, "linear_fit_r2": r2,
                  "us_per_image_max_over_min": max(per_image) / min(per_image)}


def model_sweep(ctx: Context) -> list[dict]:
    n, shape = ctx.images(MODEL_IMAGES), ctx.splits.input_shape
    rows = []
    for arch in MODELS:
        s = epoch_seconds(ctx, arch, n)
        model = ctx.model(arch)
        flops = train_flops_per_image(model, shape)
        rows.append({"sweep": "model", "model": arch, "params": count_parameters(model), "train_images": n,
                     "epoch_s": s, "img_s": n / s, "train_mflops_per_image": flops / 1e6,
                     "achieved_gflop_s": flops * n / s / 1e9})
        ctx.log(f"  {arch}: {n / s:.0f} img/s, {flops * n / s / 1e9:.1f} GFLOP/s")
    return rows


def run(ctx: Context) -> dict:
    data_rows, fit_summary = data_sweep(ctx)
    return {"rows": data_rows + model_sweep(ctx), "summary": fit_summary}
