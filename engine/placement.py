"""Which prepared splits live in memory and which stream from disk (`data.storage`).

`auto` keeps a split resident when it fits the memory budget: `data.memory_budget_mb` when set, else half of what
the host has available (and, on CUDA, half of the device's free memory), filled smallest split first, so the test
and validation splits stay resident while a train split too large to hold streams. Where a split lives never changes
its bytes, so it is not part of any stage's key. A teacher's soft-target or feature cache is placed the same way,
against what the resident splits left of the budget (`resident`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.config import DataConfig
from engine.store import SPLITS, read_manifest, split_bytes, verify

BUDGET_SHARE = 0.5  # the rest is the model's, the optimiser's, the caches' and the loader's
MAX_WORKERS = 8


def available_bytes(device: torch.device) -> int:
    """Memory a split could take: the host's MemAvailable, and on CUDA the device's free memory too."""
    host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            host = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        return min(host, torch.cuda.mem_get_info(device)[0])
    return host


def budget_bytes(data: DataConfig, device: torch.device) -> int:
    if data.memory_budget_mb is not None:
        return data.memory_budget_mb << 20
    return int(available_bytes(device) * BUDGET_SHARE)


def placement(prepared: Path, data: DataConfig, device: torch.device) -> dict[str, str]:
    """{split: "memory" | "disk"}; every split's files checked against the store's manifest first."""
    manifest = read_manifest(prepared)
    for split in SPLITS:
        verify(prepared, manifest, split)
    if data.storage != "auto":
        return {s: data.storage for s in SPLITS}
    left, out = budget_bytes(data, device), {}
    for split in sorted(SPLITS, key=lambda s: split_bytes(manifest, s)):
        size = split_bytes(manifest, split)
        out[split] = "memory" if size <= left else "disk"
        left -= size if size <= left else 0
    return out


def resident(data: DataConfig, device: torch.device, nbytes: int, taken: int) -> bool:
    """Whether a cache of `nbytes` is read into memory (else read by row from disk): as `data.storage` says, or under
    auto when it fits the budget less the `taken` bytes of resident splits."""
    if data.storage != "auto":
        return data.storage == "memory"
    return nbytes <= budget_bytes(data, device) - taken


def loader_workers(data: DataConfig, device: torch.device) -> int:
    """`data.loader_workers`, or the cores the training leaves free: on CUDA all but one, on the CPU those torch's
    threads do not use. Measured (docs/benchmarks.md §8, 2-core EPYC): two workers beside a two-thread CPU training
    left it 0.67 of its in-memory speed; reading the rows in the training's own process, 0.97."""
    if data.loader_workers is not None:
        return data.loader_workers
    cores = len(os.sched_getaffinity(0))
    busy = 1 if device.type == "cuda" else torch.get_num_threads()
    return max(0, min(MAX_WORKERS, cores - busy))
