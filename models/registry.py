"""Models by name: a new architecture is one builder function plus one `register` call."""
from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn

Builder = Callable[[str, int, int, int], nn.Module]
"""builder(name, in_channels, num_classes, image_size) -> model"""

_EXACT: dict[str, Builder] = {}
_PREFIX: dict[str, Builder] = {}


class UnknownModelError(ValueError):
    pass


def register(*names: str, prefix: bool = False) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        for name in names:
            (_PREFIX if prefix else _EXACT)[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_EXACT) + [f"{p}<name>" for p in sorted(_PREFIX)]


def check_name(name: str) -> None:
    if name in _EXACT or any(name.startswith(p) and len(name) > len(p) for p in _PREFIX):
        return
    raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(available())}")


# torch initialises weights from its one global generator. Trainings that run side by side in
# threads (an experiment's task runner) must not draw from it in between one another's seeding
# and building: every build, and every global seeding (engine.device), holds this lock.
GLOBAL_RNG_LOCK = threading.RLock()
# Counting FLOPs, torch.export (MLflow's pt2 format, the ONNX exporter) and tracing keep Python-level state
# that is global to the process (seen: "_EXPORT_MODULE_HIERARCHY must not be None" when two threads export):
# trainings that run side by side in threads take turns at these, and only at these.
TRACE_LOCK = threading.RLock()


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, seed: int | None = None) -> nn.Module:
    """The model by name. With `seed`, its initial weights are those of torch.manual_seed(seed),
    and the global generator is left as it was."""
    check_name(name)
    builder = _EXACT.get(name) or next(b for p, b in _PREFIX.items() if name.startswith(p))
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = builder(name, in_channels, num_classes, image_size)
    model.arch = name
    return model
