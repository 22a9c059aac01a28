"""A training epoch streamed from the prepared store on disk against the same epoch in memory, and peak memory
while training on a data set three times larger than a memory cap.

Throughput is the trainer's own epoch clock (images/s, augmentation included), plain-2, batch 128, one epoch: memory,
then disk with 0 and with 2 loader workers, alternating after a warm-up round, the page cache warm (the store was
just written and read). Ratio: the median over rounds of disk images/s ÷ memory images/s in the same round. Cases:
Fashion-MNIST (28 px, grey) and a generated set (64 px, RGB); on each, also a KD epoch from a soft-target cache of
2 views, everything in memory against everything on disk (splits streamed with the default number of loader workers
for this machine, cache read by row). Cold cache: the
disk runs again after dropping the page cache, when /proc/sys/vm/drop_caches can be written. Peak memory: a child
process opens a generated store of 1,000 classes three times the cap, with a soft-target cache of 4 views (full
fp16 logits) twice the cap, sets `data.memory_budget_mb` to the cap (loader workers as the default gives this
machine) and trains one KD epoch of a very narrow student (plain-2-w2) from the cache. Its
peak memory, with its loader workers', is the total proportional set size (PSS, from the kernel's smaps_rollup,
sampled every 0.1 s: a page shared by the forked workers counts once in all), compared with the cap; each process's
own high-water mark (VmHWM, which counts shared pages in every process) is recorded beside it. At full size, where
cgroup-v1 memory groups can be made, the kernel also enforces the cap: the run happens inside a memory cgroup
limited to it, page cache included.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

import numpy as np

from bench.common import Context, run_fit
from engine import augment, soft_targets
from engine.config import AugmentConfig, DataConfig
from engine.data import ImageSet, Splits
from engine.placement import loader_workers
from engine.store import write_store
from engine.trainer import Teacher
from engine.workspace import Workspace
from models import build_model

ARCH, BATCH = "plain-2", 128
GENERATED_64 = 20_000  # images at scale 1
CAP_MB = 1024  # the memory cap of the peak-memory run; its data set is three times this, its cache twice
CAP_CLASSES, CAP_VIEWS = 1000, 4  # ImageNet's classes; the cache views of the pipeline's default
CAP_ARCH = "plain-2-w2"  # what is measured is the data's and the cache's share; a student this small adds ~nothing
VIEWS = 2
WORKERS = (0, 2)
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")


def generated(n: int, size: int, seed: int = 0, classes: int = 10) -> Splits:
    """Random RGB images: throughput and memory do not depend on what the pixels show."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    held = ImageSet(x[:256].clone(), y[:256].clone())
    return Splits("generated", [str(c) for c in range(classes)], ImageSet(x, y), held, held,
                  AugmentConfig(crop_padding=4, flip=True))


def epoch_img_s(ctx: Context, folder: Path, stream: bool, workers: int, cache: Path | None = None) -> float:
    """One epoch's images/s: from labels, or KD from the soft-target cache in `cache` (read into memory when the
    splits are, else by row from disk)."""
    ws = Workspace(folder, str(ctx.device), DataConfig(storage="disk" if stream else "memory", loader_workers=workers))
    c, h, _ = ws.splits.input_shape
    model = build_model(ARCH, c, ws.splits.num_classes, h, 0).to(ctx.device, memory_format=torch.channels_last)
    teacher = cached_teacher(ws, cache, resident=not stream) if cache else None
    try:
        _, result = run_fit(ctx, model, ws.train, ws.val, batch=BATCH, spec=ws.splits.augment, teacher=teacher)
    finally:
        ws.close()  # its loader workers end here, not inside the next way's clock
    return result.history[0]["images_per_second"]


def cached_teacher(ws: Workspace, cache: Path, resident: bool) -> Teacher:
    key = soft_targets.CacheKey(**soft_targets.read_manifest(cache)["key"])
    views = augment.fixed_views(len(ws.train), ws.splits.augment, key.view_seed, key.views).to(ws.device)
    return Teacher(soft_targets.load(cache, key, ws.device, resident=resident), views)


def teacher_cache(folder: Path, out: Path) -> Path:
    """A plain-2 teacher's cache of VIEWS views over the store's train split: any teacher's rows cost the same."""
    ws = Workspace(folder, "cpu", DataConfig(storage="disk"))
    c, h, _ = ws.splits.input_shape
    key = soft_targets.CacheKey("bench", ws.fingerprint, ws.splits.augment.model_dump(), VIEWS, 0, None,
                                ws.splits.num_classes, len(ws.train))
    soft_targets.write(out, build_model(ARCH, c, ws.splits.num_classes, h, 1), ws.train, ws.splits.augment, key)
    return out


def random_cache(ws: Workspace, out: Path, views: int, block: int = 4096) -> Path:
    """A cache of random fp16 logits for `ws`'s train split, written a block of rows at a time."""
    n, c = len(ws.train), ws.splits.num_classes
    key = soft_targets.CacheKey("random", ws.fingerprint, ws.splits.augment.model_dump(), views, 0, None, c, n)
    rng = np.random.default_rng(0)
    chunks = ((k, {"values": rng.standard_normal((min(block, n - i), c), dtype=np.float32).astype(np.float16)})
              for k in range(views) for i in range(0, n, block))
    soft_targets.write_chunks(out, chunks, key)
    return out


def drop_page_cache() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def throughput(ctx: Context, case: str, folder: Path) -> list[dict]:
    cache = teacher_cache(folder, folder.with_name(folder.name + "-cache"))
    auto = loader_workers(DataConfig(), ctx.device)  # what a user gets by default on this machine
    ways = {"memory": (False, 0, None), **{f"disk, {w} workers": (True, w, None) for w in WORKERS},
            "KD, memory (cache in memory)": (False, 0, cache),
            f"KD, disk, {auto} workers (cache by row)": (True, auto, cache)}
    runs: dict[str, list[float]] = {way: [] for way in ways}
    for i in range(ctx.repeats + 1):
        found = {way: epoch_img_s(ctx, folder, *how) for way, how in ways.items()}
        if i:  # the first round warms the page cache and the allocator
            for k, v in found.items():
                runs[k].append(v)
    rows = []
    for way, values in runs.items():
        base = runs["KD, memory (cache in memory)" if way.startswith("KD") else "memory"]
        ratios = [v / m for v, m in zip(values, base)]
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
    write_store(generated(n, 64, seed=1, classes=CAP_CLASSES), folder)
    cache = random_cache(Workspace(folder, "cpu", DataConfig(storage="disk")), ctx.workdir / "cache-cap", CAP_VIEWS)
    with memory_cgroup(cap if cap >= CAP_MB else None) as group:
        done = subprocess.run([sys.executable, "-m", "bench.storage", str(folder), str(cache), str(cap),
                               str(ctx.device)], capture_output=True, text=True,
                              preexec_fn=group.join if group else None)
        enforced = group.report() if group else {"enforced": False}
    if done.returncode:
        raise RuntimeError(f"the capped run failed ({enforced}): {done.stderr[-2000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1]) | enforced
    ctx.log(f"  peak PSS {found['peak_pss_mb']:.0f} MB (cap {cap} MB, enforced: {found['enforced']}) distilling on "
            f"{n} images ({found['train_mb']:.0f} MB) from a {found['cache_mb']:.0f} MB cache; train split in "
            f"{found['placement']['train']}, cache {'in memory' if found['cache_resident'] else 'read by row'}")
    return {"cap_mb": cap, "train_images": n, **found, "under_cap": found["peak_pss_mb"] < cap}


class MemoryCgroup:
    """A cgroup-v1 memory group with a hard limit: the kernel itself holds a run and its loader workers under the
    cap (page cache included, which it reclaims), and counts what they used."""

    def __init__(self, path: Path, cap_mb: int):
        self.path = path
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(cap_mb << 20))

    def join(self) -> None:  # in the child, before it runs anything
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def report(self) -> dict:
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {"enforced": True, "cgroup_max_usage_mb": int((self.path / "memory.max_usage_in_bytes").read_text())
                / 2**20, "cgroup_limit_hits": int((self.path / "memory.failcnt").read_text()),
                "cgroup_oom_kills": int(oom.get("oom_kill", 0))}


@contextmanager
def memory_cgroup(cap_mb: int | None):
    """A MemoryCgroup under this process's own, or None where cgroup-v1 memory groups cannot be made here (or no cap
    is given: below the interpreter's own size, a cap would only kill the run)."""
    try:
        if cap_mb is None:
            raise OSError("no cap")
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.split(":")[1] == "memory")
        group = MemoryCgroup(MEMORY_CGROUPS / own.lstrip("/") / f"takd-bench-{os.getpid()}", cap_mb)
    except (StopIteration, OSError):
        yield None
        return
    try:
        yield group
    finally:
        group.path.rmdir()


def _vm_hwm_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pss_mb(pid: int | str) -> float:
    """The proportional set size: a page shared by k processes counts 1/k in each, so a forked worker's copy of
    the parent's untouched pages is not counted twice."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakPss:
    """Samples the total PSS of this process and its children every `every` seconds, in a thread."""

    def __init__(self, every: float = 0.1):
        import psutil

        self.peak, self.every, self.me = 0.0, every, psutil.Process()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(self.every):
            total = 0.0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += _pss_mb(p.pid)
                except OSError:  # a worker that just ended
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self) -> "PeakPss":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _capped_epoch(folder: str, cache: str, cap_mb: str, device: str) -> None:
    """The child of `peak_memory`: one KD epoch under the cap, then the peak memory, as JSON on stdout."""
    import psutil

    with PeakPss() as pss:
        ws = Workspace(Path(folder), device, DataConfig(memory_budget_mb=int(cap_mb)))
        c, h, _ = ws.splits.input_shape
        model = build_model(CAP_ARCH, c, ws.splits.num_classes, h, 0).to(ws.device, memory_format=torch.channels_last)
        ctx = Context(DataConfig(), ws.device, Path(folder))
        cache_bytes = soft_targets.read_manifest(Path(cache))["bytes"]
        kept = ws.keeps_resident(cache_bytes)
        seconds, _ = run_fit(ctx, model, ws.train, ws.val, batch=BATCH, spec=ws.splits.augment,
                             teacher=cached_teacher(ws, Path(cache), kept))
        workers = [_vm_hwm_mb(p.pid) for p in psutil.Process().children(recursive=True)]
    main = _vm_hwm_mb()
    print(json.dumps({"placement": ws.placement, "train_mb": math.prod(ws.train.x.images.shape) / 2**20,
                      "cache_mb": cache_bytes / 2**20, "cache_resident": kept, "peak_pss_mb": pss.peak,
                      "main_vm_hwm_mb": main, "worker_vm_hwm_mb": workers, "epoch_s": seconds}))


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
                "its cache MB": round(cap["cache_mb"]), "its cache was": "in memory" if cap["cache_resident"] else
                "read by row", "its peak PSS MB (process + loader workers)": cap["peak_pss_mb"],
                "under the cap": cap["under_cap"], "cap enforced by a memory cgroup": cap["enforced"],
                "its train split was read from": cap["placement"]["train"]}
    return {"rows": rows, "summary": summary, "peak_memory": cap}


if __name__ == "__main__":
    _capped_epoch(*sys.argv[1:5])
