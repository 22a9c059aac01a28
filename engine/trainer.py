"""One training loop for teacher, assistant, student, baselines and fine-tuning.

Data lives on the device as uint8, or streams from disk when it does not fit (engine/feed.py); each step takes a
batch by index, augments it on the device, and, when distilling, looks up the teacher's logits for exactly the view the
student sees. All randomness flows through one generator, saved in every checkpoint,
so a resumed run ends with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import copy
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from engine import augment
from engine.atomic import load_torch, save_torch
from engine.config import AugmentConfig, KDConfig, TrainConfig
from engine.feed import DeviceSet
from engine.device import autocast
from engine.errors import DivergedError
from engine.losses import Batch, DistillLoss, lam_at
from engine.soft_targets import Targets

Callback = Callable[[dict], None]


@dataclass
class Teacher:
    """Where soft targets come from: a SoftTargets cache or an OnlineTeacher, plus the fixed views."""

    targets: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
    views: augment.Views  # [K, N]

    @property
    def k_views(self) -> int:
        return self.views.dx.shape[0]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_val_acc: float = -1.0
    best_epoch: int = -1


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total, warm = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:  # stepped every iteration: a linear warm-up, then the schedule over the rest
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(1, total - warm)))
        if cfg.lr_schedule == "step":
            return cfg.gamma ** sum(step >= m * steps_per_epoch for m in cfg.milestones)
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def predict(model: nn.Module, data: DeviceSet, batch_size: int = 1024) -> torch.Tensor:
    """Logits for a whole split, un-augmented, in order."""
    model.eval()
    out = []
    for _, x in data.batches(torch.arange(len(data)), batch_size):
        with autocast(data.device):
            out.append(model(data.normalize(x)).float())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def _checkpoint(model, opt, sched, gen, epoch, result, run_key) -> dict:
    return {"run_key": run_key, "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": gen.get_state(), "history": result.history,
            "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch}


def _resume(path: Path, run_key: str, model, opt, sched, gen, result) -> int:
    if not path.exists():
        return 0
    ckpt = load_torch(path)
    if ckpt.get("run_key") != run_key:
        return 0  # a checkpoint of some other configuration: start over, it gets overwritten
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    gen.set_state(ckpt["rng"])
    result.history, result.best_val_acc, result.best_epoch = ckpt["history"], ckpt["best_val_acc"], ckpt["best_epoch"]
    return ckpt["epoch"]


def _batch(train: DeviceSet, idx: torch.Tensor, x: torch.Tensor, spec: AugmentConfig, generator: torch.Generator,
           teacher: Teacher | None) -> tuple[torch.Tensor, torch.Tensor | Targets | None]:
    """Images `x` (rows `idx`) augmented and normalised and, when distilling, the teacher's logits for exactly
    the views the student sees (one of the K cached views per image)."""
    if teacher is None:
        views = augment.random_views(len(idx), spec, generator).to(x.device)
        return train.normalize(augment.apply(x, views, spec)), None
    view = torch.randint(0, teacher.k_views, (len(idx),), generator=generator).to(x.device)
    x = train.normalize(augment.apply(x, teacher.views[view, idx], spec))
    return x, teacher.targets(idx, view, x)


class _Checkpoints:
    """Writes each epoch's checkpoints on a background thread, so training never waits on the
    disk (fsync included). The state is snapshotted first; one write runs at a time, and a
    failed write raises at the next save or at `close`."""

    def __init__(self, last: Path | None, best: Path | None):
        self.last, self.best = last, best
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if last else None
        self._pending: Future | None = None

    def save(self, last_state: dict, best_state: dict | None) -> None:
        if not self._pool:
            return
        self.wait()
        writes = ([(best_state, self.best)] if best_state else []) + [(copy.deepcopy(last_state), self.last)]
        self._pending = self._pool.submit(lambda: [save_torch(obj, path) for obj, path in writes])

    def wait(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        if self._pool:
            try:
                self.wait()
            finally:
                self._pool.shutdown()


def _train_epoch(forward, train: DeviceSet, cfg: TrainConfig, loss_fn: DistillLoss, opt, sched, generator,
                 spec: AugmentConfig, teacher: Teacher | None, lam: float, bar: dict, where: tuple[str, int]) -> dict:
    """One pass over the training set; returns the epoch's summed losses and correct count.

    `forward` returns logits, or (logits, {name: feature}) when the loss reads features."""
    device, n = train.device, len(train)
    check_every = 1 if device.type == "cpu" else 50  # a finiteness check syncs an accelerator; free on the CPU
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=device)
    perm = torch.randperm(n, generator=generator)
    steps = math.ceil(n / cfg.batch_size)
    for step, (idx, images) in enumerate(tqdm(train.batches(perm, cfg.batch_size), total=steps, leave=False, **bar)):
        x, targets = _batch(train, idx, images, spec, generator, teacher)
        t = Targets.of(targets)
        y = train.y[idx]
        with autocast(device):
            out = forward(x)
        logits, feats = out if isinstance(out, tuple) else (out, {})
        # The loss runs in fp32: relation losses subtract near-equal Gram entries, which bf16 would round away.
        feats = {k: v.float() for k, v in feats.items()}
        epoch = where[1] - 1 + step / steps
        batch = Batch(logits.float(), y, t.logits, feats, t.features, epoch, t.weights, cfg.label_smoothing, idx)
        parts = loss_fn(batch, lam)
        if (step + 1) % check_every == 0 and not torch.isfinite(parts["total"]):
            raise DivergedError(f"{where[0]}: loss is {parts['total'].item()} at epoch {where[1]}, step {step + 1}")
        opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        opt.step()
        sched.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
    if not torch.isfinite(sums["total"]):  # caught here when the per-step check is sparse
        raise DivergedError(f"{where[0]}: loss is not finite in epoch {where[1]}")
    return {"sums": sums, "correct": correct}


def fit(model: nn.Module, train: DeviceSet, val: DeviceSet, cfg: TrainConfig, loss_fn: DistillLoss,
        generator: torch.Generator, spec: AugmentConfig, *, kd: KDConfig | None = None,
        teacher: Teacher | None = None, workdir: Path | None = None, run_key: str = "",
        callback: Callback | None = None, desc: str = "train", progress: bool | None = None,
        test: DeviceSet | None = None) -> FitResult:
    """Train `model`; leave it holding the weights that were best on validation.

    `test`: also record each epoch's test accuracy, for comparison with papers that keep the best test
    epoch; it never selects anything. `progress`: None shows a bar only on a terminal; True or False forces it."""
    device, n = train.device, len(train)
    # What the optimiser trains: the model as the loss wraps it (feature taps, peers, exits)
    # plus the loss's own parameters (a regressor). Only `model` is evaluated and kept.
    wrapped = loss_fn.wrap(model)
    trained = nn.ModuleList([wrapped, loss_fn])
    opt, sched = make_optimizer(trained, cfg, math.ceil(n / cfg.batch_size))
    result = FitResult()
    last, best = (workdir / "last.pt", workdir / "best.pt") if workdir else (None, None)
    start = _resume(last, run_key, trained, opt, sched, generator, result) if last else 0
    best_state = None
    forward = torch.compile(wrapped) if cfg.compile else wrapped  # shares weights; state_dict stays plain
    checkpoints = _Checkpoints(last, best)
    try:
        for epoch in range(start, cfg.epochs):
            trained.train()
            lam = lam_at(kd, epoch, cfg.epochs) if kd else 0.0
            bar = {"desc": f"{desc} {epoch + 1}/{cfg.epochs}", "disable": None if progress is None else not progress}
            t0 = time.perf_counter()
            try:
                out = _train_epoch(forward, train, cfg, loss_fn, opt, sched, generator, spec, teacher, lam, bar,
                                   (desc, epoch + 1))
            except DivergedError as e:
                checkpoints.wait()
                raise DivergedError(f"{e}; the last good checkpoint is kept at {last}") from None
            seconds = time.perf_counter() - t0
            val_acc = accuracy(predict(model, val, cfg.eval_batch_size), val.y)
            metrics = {"epoch": epoch + 1, **{f"loss_{k}": (v / n).item() for k, v in out["sums"].items()},
                       "train_acc": (out["correct"] / n).item(), "val_acc": val_acc, "lr": opt.param_groups[0]["lr"],
                       "lam": lam, "epoch_seconds": seconds, "images_per_second": n / seconds}
            if test is not None:
                metrics["epoch_test_acc"] = accuracy(predict(model, test, cfg.eval_batch_size), test.y)
            result.history.append(metrics)
            best_file = None
            if val_acc > result.best_val_acc:
                result.best_val_acc, result.best_epoch = val_acc, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best_file = {"run_key": run_key, "epoch": epoch + 1, "val_acc": val_acc, "model": best_state}
            checkpoints.save(_checkpoint(trained, opt, sched, generator, epoch + 1, result, run_key), best_file)
            if callback:
                callback(metrics)
    finally:
        checkpoints.close()
    if best_state is None and best is not None and best.exists():  # resumed after the best epoch
        best_state = load_torch(best, map_location=device)["model"]
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
