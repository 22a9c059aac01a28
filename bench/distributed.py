"""One training over one process and over two (DDP, started by torchrun), side by side.

Throughput is the trainer's own epoch clock (images/s, augmentation included, startup excluded): plain-2, batch 128
(the whole step's batch: each of two ranks takes 64), the warm-up epoch dropped. Cases alternate in rounds (one
process with every core as threads, then two processes with an equal share of the cores each), and the ratio is the
median over rounds of two ÷ one in the same round. On a GPU machine the same runs use NCCL, one process per GPU
(two when there are two GPUs; one GPU: the single-rank DDP group against no DDP, the wrapper's own cost).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import torch

from bench.common import Context

ARCH, BATCH, IMAGES, EPOCHS = "plain-2", 128, 20_000, 1


def _cases(ctx: Context) -> list[tuple[str, int]]:
    if ctx.device.type == "cuda":
        gpus = torch.cuda.device_count()
        return [("1 process, no DDP", 0), (f"{max(1, min(gpus, 2))} process(es), DDP over NCCL", max(1, min(gpus, 2)))]
    return [("1 process", 0), ("2 processes, DDP over gloo", 2)]


def _run(ctx: Context, procs: int, images: int, tag: str) -> list[float]:
    """Timed epochs' images/s; procs 0: one plain process, else torchrun with that many ranks."""
    cores = os.cpu_count() or 1
    out = ctx.workdir / f"ddp-{tag}.json"
    settings = {"data": ctx.data.model_dump(), "device": ctx.device.type, "arch": ARCH, "batch": BATCH,
                "images": images, "epochs": EPOCHS, "threads": max(1, cores // max(procs, 1)), "out": str(out)}
    path = ctx.workdir / f"ddp-{tag}-settings.json"
    path.write_text(json.dumps(settings))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                if procs else [sys.executable])
    run = subprocess.run([*launcher, "-m", "bench.ddp_worker", str(path)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"distributed suite: {' '.join(launcher)} failed:\n{run.stderr[-3000:]}")
    return json.loads(out.read_text())


def run(ctx: Context) -> dict:
    ctx.splits  # prepared once, before any rank reads it
    images = ctx.images(IMAGES)
    cases = _cases(ctx)
    rows: dict[str, list[float]] = {name: [] for name, _ in cases}
    ratios = []
    for r in range(ctx.repeats):
        got = {name: statistics.median(_run(ctx, procs, images, f"{r}-{procs}")) for name, procs in cases}
        for name, value in got.items():
            rows[name].append(value)
            ctx.log(f"  round {r + 1}, {name}: {value:.0f} img/s")
        ratios.append(got[cases[1][0]] / got[cases[0][0]])
    return {"rows": [{"case": name, "processes": procs, "arch": ARCH, "batch": BATCH, "train_images": images,
                      "img_s_median": statistics.median(rows[name]), "img_s_rounds": rows[name]}
                     for name, procs in cases],
            "summary": {"two_over_one_median": statistics.median(ratios), "ratios": ratios}}
