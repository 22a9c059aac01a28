"""Device choice and the per-device speed settings we measured."""
from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import torch

from models.registry import GLOBAL_RNG_LOCK


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on CPU it is off (this CPU has no bf16 units: 5x slower)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> torch.Generator:
    """Seeds torch's global RNG (model init) and returns the trainer's own generator."""
    with GLOBAL_RNG_LOCK:  # never between another thread's seeding and building
        torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform reports."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()
