"""What every benchmark shares: the machine's description, the data, timing, tracked model runs."""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from engine.config import AugmentConfig, DataConfig, KDConfig, TrainConfig
from engine.data import Splits, load_splits
from engine.feed import DeviceSet
from engine.device import cpu_name
from engine.losses import build_loss
from engine.trainer import FitResult, fit
from models import build_model

NO_AUGMENT = AugmentConfig(crop_padding=0, flip=False)


@dataclass
class Context:
    """One benchmark session: where data comes from, the device, how many repeats, a scratch dir."""

    data: DataConfig
    device: torch.device
    workdir: Path
    repeats: int = 3
    scale: float = 1.0  # share of the standard sizes; the tests run the suites at a sliver of it
    log: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)

    @cached_property
    def splits(self) -> Splits:
        return load_splits(self.data)

    @cached_property
    def mean_std(self) -> tuple[list[float], list[float]]:
        return self.splits.mean_std()

    def images(self, n: int) -> int:
        """`n` images scaled to this session, never more than the train split holds."""
        return max(16, min(len(self.splits.train), int(n * self.scale)))

    def device_set(self, part: str = "train", n: int | None = None) -> DeviceSet:
        data = getattr(self.splits, part)
        if n is not None and n < len(data):
            data = data.subset(torch.arange(n))
        return DeviceSet(data, *self.mean_std, self.device)

    def model(self, arch: str, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        c, h, _ = self.splits.input_shape
        model = build_model(arch, c, self.splits.num_classes, h)
        return model.to(self.device, memory_format=torch.channels_last)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed(ctx: Context, fn: Callable[[], object]) -> float:
    ctx.sync()
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    return time.perf_counter() - t0


def median_seconds(ctx: Context, fn: Callable[[], object], repeats: int | None = None) -> tuple[float, list[float]]:
    """Median wall time over `repeats` calls (each call sets up its own fresh state)."""
    runs = [timed(ctx, fn) for _ in range(repeats or ctx.repeats)]
    return statistics.median(runs), [round(r, 4) for r in runs]


def run_fit(ctx: Context, model: nn.Module, train: DeviceSet, val: DeviceSet, *, epochs: int = 1, batch: int = 128,
            compile: bool = False, spec: AugmentConfig | None = None, teacher=None, logger=None,
            checkpoints: bool = False) -> tuple[float, FitResult]:
    """One timed `fit` call: cross entropy, or Hinton KD when a `teacher` is given. With `logger`
    and `checkpoints` it runs as the pipeline runs it: MLflow per epoch, progress bar on, epoch
    checkpoints in a fresh folder."""
    kd = KDConfig() if teacher else None
    workdir = Path(tempfile.mkdtemp(dir=ctx.workdir)) if checkpoints else None
    cfg = TrainConfig(epochs=epochs, batch_size=batch, compile=compile)
    out = {}
    try:
        seconds = timed(ctx, lambda: out.setdefault("result", fit(
            model, train, val, cfg, build_loss("kd" if teacher else "ce", kd or KDConfig()), torch.Generator().manual_seed(0),
            spec or ctx.splits.augment, kd=kd, teacher=teacher, workdir=workdir, run_key="bench",
            callback=logger.epoch if logger else None, progress=True if logger else None)))
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return seconds, out["result"]


def machine(device: torch.device) -> dict:
    info = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@contextmanager
def mlflow_run(workdir: Path) -> Iterator:
    """A real MLflow run in a scratch SQLite store; yields the pipeline's ModelRun, whose `epoch` logs each epoch."""
    from engine.config import TrainConfig
    from engine.spec import TrainSpec
    from tasks.config import TrackingConfig
    from tasks.run_context import RunContext
    from tasks.tracking import ModelRun

    store = workdir / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(store, torch.get_num_threads(), tracking=True, store=f"sqlite:///{store / 'mlflow.db'}")
    spec = TrainSpec(role="student", arch="bench", train=TrainConfig(), name="bench", title="bench")
    run = ModelRun(ctx, TrackingConfig(experiment="bench"), None, spec)
    run.start({})
    try:
        yield run
    finally:
        run.end("FINISHED")
