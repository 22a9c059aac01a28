"""The GPU path. Data resident on the GPU, bf16 autocast, channels_last, and
torch.compile off and on, for plain-10, resnet-20 and resnet-110: our trainer's images per
second against the bare loop's on the same GPU.

It runs only where CUDA is present, unless forced (the tests force it on the CPU so this
same code path runs in CI).
"""
from __future__ import annotations

from bench.common import Context
from bench.overhead import compare

MODELS = ["plain-10", "resnet-20", "resnet-110"]
TRAIN_IMAGES, EPOCHS, BATCH = 50_000, 2, 128


def run(ctx: Context) -> dict:
    if ctx.device.type != "cuda" and not ctx.extra.get("force_gpu_suite"):
        return {"rows": [], "summary": {"skipped": f"no CUDA device here (device {ctx.device})"}}
    rows = []
    for arch in ctx.extra.get("gpu_models", MODELS):  # the tests run the path with the first model only
        for compile in ctx.extra.get("compile_modes", (False, True)):
            row = compare(ctx, arch, ctx.images(TRAIN_IMAGES), compile=compile, epochs=EPOCHS, batch=BATCH)
            ctx.log(f"  {arch} compile={compile}: trainer {row['trainer_img_s']:.0f} img/s, ratio {row['ratio']:.3f}")
            rows.append(row)
    return {"rows": rows, "summary": {"worst_ratio": min((r["ratio"] for r in rows), default=None),
                                      "paper_profile": "not run: CIFAR cannot be downloaded on the device machine"}}
