"""A training epoch streamed from the prepared store on disk against the same epoch in memory, and peak memory
while training on a data set three times larger than a memory cap.

Throughput is the trainer's own epoch clock (images/s, augmentation included), plain-2, batch 128, one epoch: memory,
then disk with 0 and with 2 loader workers, alternating after a warm-up round, the page cache warm (the store was
just written and read). Ratio: the median over rounds of disk images/s ÷ memory images/s in the same round. Cases:
Fashion-MNIST (28 px, grey) and a generated set (64 px, RGB). Cold cache: the disk runs again after dropping the page
cache, when /proc/sys/vm/drop_caches can be written. Peak memory: a child process opens a generated store three
times the cap with `data.memory_budget_mb` = the cap and trains one epoch; its peak resident set (the kernel's
VmHWM) plus that of each loader worker is compared with the cap.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import Context, run_fit
from engine.config import AugmentConfig, DataConfig
from engine.data import ImageSet, Splits
from engine.feed import DeviceSet
from engine.store import write_store
from engine.workspace import Workspace
from models import build_model

ARCH, BATCH = "plain-2", 128
GENERATED_64 = 20_000  # images at scale 1
CAP_MB = 1024  # the memory cap of the peak-memory run; its data set is three times this
WORKERS = (0, 2)
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def generated(n: int, size: int, seed: int = 0) -> Splits:
    """Random RGB images in 10 classes: throughput and memory do not depend on what the pixels show."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    held = ImageSet(x[:256].clone(), y[:256].clone())
    return Splits("generated", [str(c) for c in range(10)], ImageSet(x, y), held, held,
                  AugmentConfig(crop_padding=4, flip=True))


def epoch_img_s(ctx: Context, folder: Path, stream: bool, workers: int) -> float:
    ws = Workspace(folder, str(ctx.device), DataConfig(storage="disk" if stream else "memory", loader_workers=workers))
    c, h, _ = ws.splits.input_shape
    model = build_model(ARCH, c, ws.splits.num_classes, h, 0).to(ctx.device, memory_format=torch.channels_last)
    _, result = run_fit(ctx, model, ws.train, ws.val, batch=BATCH, spec=ws.splits.augment)
    return result.history[0]["images_per_second"]


def drop_page_cache() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def throughput(ctx: Context, case: str, folder: Path) -> list[dict]:
    runs: dict[str, list[float]] = {"memory": [], **{f"disk, {w} workers": [] for w in WORKERS}}
    for i in range(ctx.repeats + 1):
        found = {"memory": epoch_img_s(ctx, folder, False, 0)}
        found |= {f"disk, {w} workers": epoch_img_s(ctx, folder, True, w) for w in WORKERS}
        if i:  # the first round warms the page cache and the allocator
            for k, v in found.items():
                runs[k].append(v)
    rows = []
    for way, values in runs.items():
        ratios = [v / m for v, m in zip(values, runs["memory"])]
        rows.append({"case": case, "way": way, "cache": "warm", "img_s": statistics.median(values),
                     "ratio_to_memory": statistics.median(ratios), "ratio_range": f"{min(ratios):.2f}-{max(ratios):.2f}"})
        ctx.log(f"  {case}, {way}: {rows[-1]['img_s']:.0f} img/s, {rows[-1]['ratio_to_memory']:.2f} of memory")
    memory = rows[0]["img_s"]
    for w in WORKERS:
        if drop_page_cache():
            cold = epoch_img_s(ctx, folder, True, w)
            rows.append({"case": case, "way": f"disk, {w} workers", "cache": "cold", "img_s": cold,
                         "ratio_to_memory": cold / memory, "ratio_range": "one run"})
    return rows


def peak_memory(ctx: Context) -> dict:
    cap = max(16, int(CAP_MB * ctx.scale))
    n = 3 * (cap << 20) // (3 * 64 * 64)
    folder = ctx.workdir / "store-cap"
    write_store(generated(n, 64, seed=1), folder)
    done = subprocess.run([sys.executable, "-m", "bench.storage", str(folder), str(cap), str(ctx.device)],
                          capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    ctx.log(f"  peak resident {found['peak_mb']:.0f} MB (cap {cap} MB) training on {n} images "
            f"({found['train_mb']:.0f} MB), train split in {found['placement']['train']}")
    return {"cap_mb": cap, "train_images": n, **found, "under_cap": found["peak_mb"] < cap}


def _vm_hwm_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _capped_epoch(folder: str, cap_mb: int, device: str) -> None:
    """The child of `peak_memory`: one epoch under the cap, then the peak resident sets, as JSON on stdout."""
    import psutil

    ws = Workspace(Path(folder), device, DataConfig(memory_budget_mb=cap_mb, loader_workers=2))
    c, h, _ = ws.splits.input_shape
    model = build_model(ARCH, c, ws.splits.num_classes, h, 0).to(ws.device, memory_format=torch.channels_last)
    ctx = Context(DataConfig(), ws.device, Path(folder))
    seconds, _ = run_fit(ctx, model, ws.train, ws.val, batch=BATCH, spec=ws.splits.augment)
    workers = [_vm_hwm_mb(p.pid) for p in psutil.Process().children(recursive=True)]
    main = _vm_hwm_mb()
    print(json.dumps({"placement": ws.placement, "train_mb": math.prod(ws.train.x.images.shape) / 2**20,
                      "main_peak_mb": main, "worker_peaks_mb": workers, "peak_mb": main + sum(workers),
                      "epoch_s": seconds}))


def run(ctx: Context) -> dict:
    rows = []
    fashion = ctx.workdir / "store-fashion"
    splits = ctx.splits
    if ctx.scale < 1:
        splits = Splits(splits.name, splits.classes, splits.train.subset(torch.arange(ctx.images(54_000))),
                        splits.val, splits.test, splits.augment, splits.norm)
    write_store(splits, fashion)
    rows += throughput(ctx, "Fashion-MNIST 28 px", fashion)
    big = ctx.workdir / "store-64"
    write_store(generated(max(256, int(GENERATED_64 * ctx.scale)), 64), big)
    rows += throughput(ctx, "generated 64 px", big)
    cap = peak_memory(ctx)
    summary = {f"{r['case']}, {r['way']}, {r['cache']}: disk / memory": r["ratio_to_memory"] for r in rows
               if r["way"] != "memory"}
    summary |= {"cold cache measured": any(r["cache"] == "cold" for r in rows),
                "peak-memory run: cap MB": cap["cap_mb"], "its train split MB": cap["train_mb"],
                "its peak resident MB (process + loader workers)": cap["peak_mb"], "under the cap": cap["under_cap"],
                "its train split was read from": cap["placement"]["train"]}
    return {"rows": rows, "summary": summary, "peak_memory": cap}


if __name__ == "__main__":
    _capped_epoch(*sys.argv[1:4])
