"""One training loop for teacher, assistant, student, baselines and fine-tuning.

Data lives on the device as uint8, or streams from disk when it does not fit (engine/feed.py); each step takes a
batch by index, augments it on the device, and, when distilling, looks up the teacher's logits for exactly the view the
student sees. All randomness flows through one generator, saved in every checkpoint,
so a resumed run ends with the same metrics as an uninterrupted one.

Over several processes (engine/distributed.py) every rank draws the same order and augmentation for each whole
batch and trains on its share of it; DDP averages the gradients, the epoch's sums are added over the ranks, and
rank 0 alone writes checkpoints and reports.
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
from engine.distributed import Ranks, plain_batchnorm, ranks, sync_batchnorm
from engine.errors import DivergedError, KDError
from engine.losses import Batch, DistillLoss, lam_at
from engine.soft_targets import Targets
from engine.spec import Parallel

Callback = Callable[[dict], None]


@dataclass
class Teacher:
    """Where soft targets come from: a SoftTargets cache or an OnlineTeacher, plus the fixed views (None: a fresh
    random view at every step, for a teacher run online)."""

    targets: Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], torch.Tensor]
    views: Optional[augment.Views]  # [K, N]

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
def predict(model: nn.Module, data: DeviceSet, batch_size: int = 1024, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits for a whole split (or its `rows`), un-augmented, in order."""
    model.eval()
    out = []
    rows = torch.arange(len(data)) if rows is None else rows
    for _, x in data.batches(list(rows.split(batch_size))):
        with autocast(data.device):
            out.append(model(data.normalize(x)).float())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def split_accuracy(model: nn.Module, data: DeviceSet, batch_size: int) -> float:
    """Accuracy on a whole split; over several processes each predicts its share and the counts are added."""
    group = ranks()
    if group.world == 1:
        return accuracy(predict(model, data, batch_size), data.y)
    rows = torch.arange(len(data))[group.share(len(data))]
    correct = (predict(model, data, batch_size, rows).argmax(1) == data.y[rows.to(data.device)]).sum().float()
    return (group.sum(correct) / len(data)).item()


def _checkpoint(model, opt, sched, gen, epoch, result, run_key) -> dict:
    return {"run_key": run_key, "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": gen.get_state(), "history": result.history,
            "best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch}


def _resume(path: Path, run_key: str, model, opt, sched, gen, result) -> int:
    # Rank 0 reads its checkpoint and hands it to the others: their machines need not see its disk.
    group = ranks()
    ckpt = group.broadcast(load_torch(path) if group.main and path.exists() else None)
    if ckpt is None or ckpt.get("run_key") != run_key:
        return 0  # a checkpoint of some other configuration: start over, it gets overwritten
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    gen.set_state(ckpt["rng"])
    result.history, result.best_val_acc, result.best_epoch = ckpt["history"], ckpt["best_val_acc"], ckpt["best_epoch"]
    return ckpt["epoch"]


def _batch(train: DeviceSet, idx: torch.Tensor, x: torch.Tensor, spec: AugmentConfig, generator: torch.Generator,
           teacher: Teacher | None, whole: int, share: slice) -> tuple[torch.Tensor, torch.Tensor | Targets | None]:
    """Images `x` (rows `idx`) augmented and normalised and, when distilling, the teacher's logits for exactly
    the views the student sees (one of the K cached views per image, or a fresh one). The draws are made for the
    `whole` batch and this process's `share` kept, so every rank's generator stays in step with one process's."""
    if teacher is None or teacher.views is None:
        views = augment.random_views(whole, spec, generator)[share].to(x.device)
        x = train.normalize(augment.apply(x, views, spec))
        return x, teacher.targets(idx, None, x) if teacher else None
    view = torch.randint(0, teacher.k_views, (whole,), generator=generator)[share].to(x.device)
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


def _shares(perm: torch.Tensor, batch_size: int, group: Ranks) -> tuple[list[torch.Tensor], list[int]]:
    """This process's rows of each batch of `perm`, and each batch's whole size. Over several processes a last
    batch smaller than the group is dropped: a rank with no images cannot join the step."""
    whole = list(perm.split(batch_size))
    if group.world > 1 and len(whole[-1]) < group.world:
        whole.pop()
    return [b[group.share(len(b))] for b in whole], [len(b) for b in whole]


def _train_epoch(forward, loss_call, train: DeviceSet, cfg: TrainConfig, opt, sched, generator,
                 spec: AugmentConfig, teacher: Teacher | None, lam: float, bar: dict, where: tuple[str, int]) -> dict:
    """One pass over the training set; returns the epoch's summed losses and correct count (over every rank).

    `forward` returns logits, or (logits, {name: feature}) when the loss reads features."""
    device, n, group = train.device, len(train), ranks()
    check_every = 1 if device.type == "cpu" else 50  # a finiteness check syncs an accelerator; free on the CPU
    sums: dict[str, torch.Tensor] = {}
    correct = torch.zeros((), device=device)
    perm = torch.randperm(n, generator=generator)
    order, sizes = _shares(perm, cfg.batch_size, group)
    batches = zip(train.batches(order), sizes)
    for step, ((idx, images), whole) in enumerate(tqdm(batches, total=len(order), leave=False, **bar)):
        x, targets = _batch(train, idx, images, spec, generator, teacher, whole, group.share(whole))
        t = Targets.of(targets)
        y = train.y[idx]
        with autocast(device):
            out = forward(x)
        logits, feats = out if isinstance(out, tuple) else (out, {})
        # The loss runs in fp32: relation losses subtract near-equal Gram entries, which bf16 would round away.
        feats = {k: v.float() for k, v in feats.items()}
        epoch = where[1] - 1 + step / len(order)
        batch = Batch(logits.float(), y, t.logits, feats, t.features, epoch, t.weights, cfg.label_smoothing, idx)
        parts = loss_call(batch, lam)
        if (step + 1) % check_every == 0 and not torch.isfinite(parts["total"]):
            raise DivergedError(f"{where[0]}: loss is {parts['total'].item()} at epoch {where[1]}, step {step + 1}")
        opt.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: weighting each by its share makes that the whole batch's mean.
        total = parts["total"] * (len(idx) * group.world / whole) if group.world > 1 else parts["total"]
        total.backward()
        opt.step()
        sched.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
    if group.world > 1:  # one reduction for every sum
        names = list(sums)
        totals = group.sum(torch.stack([sums[k].reshape(()) for k in names] + [correct]).float())
        sums, correct = dict(zip(names, totals[:-1])), totals[-1]
    if not torch.isfinite(sums["total"]):  # caught here when the per-step check is sparse
        raise DivergedError(f"{where[0]}: loss is not finite in epoch {where[1]}")
    return {"sums": sums, "correct": correct, "images": sum(sizes)}


def _per_step(cfg: TrainConfig, parallel: Parallel | None, group: Ranks) -> TrainConfig:
    """The recipe as one step sees it: with batch per_process, a step's batch and lr grow with the processes."""
    if (parallel.processes if parallel else 1) != group.world:
        raise KDError(f"the training asks for {parallel.processes if parallel else 1} process(es) "
                      f"(distributed.nproc_per_node x nnodes) but runs in a group of {group.world}; start it with the "
                      "stage command, which launches torchrun with the configured processes")
    if parallel is None or parallel.batch == "global":
        return cfg
    return cfg.model_copy(update={"batch_size": cfg.batch_size * group.world, "lr": cfg.lr * group.world})


def _replicas(wrapped: nn.Module, loss_fn: DistillLoss, group: Ranks, device: torch.device):
    """What the step calls: the model and the loss, each under DDP when there are several processes and it has
    something to train (a regressor, a learned temperature). A frozen teacher is never wrapped."""
    if group.world == 1:
        return wrapped, loss_fn
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    trains = lambda m: any(p.requires_grad for p in m.parameters())  # noqa: E731
    return DDP(wrapped, device_ids=ids), DDP(loss_fn, device_ids=ids) if trains(loss_fn) else loss_fn


def fit(model: nn.Module, train: DeviceSet, val: DeviceSet, cfg: TrainConfig, loss_fn: DistillLoss,
        generator: torch.Generator, spec: AugmentConfig, *, kd: KDConfig | None = None,
        teacher: Teacher | None = None, workdir: Path | None = None, run_key: str = "",
        callback: Callback | None = None, desc: str = "train", progress: bool | None = None,
        test: DeviceSet | None = None, parallel: Parallel | None = None, stop_after: int | None = None) -> FitResult:
    """Train `model`; leave it holding the weights that were best on validation.

    `test`: also record each epoch's test accuracy, for comparison with papers that keep the best test
    epoch; it never selects anything. `progress`: None shows a bar only on a terminal; True or False forces it.
    `parallel`: the processes it is trained by (started by torchrun; None: this one alone). `stop_after`: run
    only that many epochs of cfg.epochs' schedule (the learning rate and lam as the whole run has them)."""
    device, n, group = train.device, len(train), ranks()
    cfg = _per_step(cfg, parallel, group)
    # What the optimiser trains: the model as the loss wraps it (feature taps, peers, exits)
    # plus the loss's own parameters (a regressor). Only `model` is evaluated and kept.
    wrapped = loss_fn.wrap(model)
    trained = nn.ModuleList([wrapped, loss_fn])
    if parallel and parallel.sync_batchnorm:
        sync_batchnorm(trained, device)  # before the optimiser: the swap makes new parameters
    opt, sched = make_optimizer(trained, cfg, len(_shares(torch.arange(n), cfg.batch_size, group)[0]))
    result = FitResult()
    last, best = (workdir / "last.pt", workdir / "best.pt") if workdir else (None, None)
    start = _resume(last, run_key, trained, opt, sched, generator, result) if last else 0
    best_state = None
    forward, loss_call = _replicas(wrapped, loss_fn, group, device)
    forward = torch.compile(forward) if cfg.compile else forward  # shares weights; state_dict stays plain
    checkpoints = _Checkpoints(*((last, best) if group.main else (None, None)))
    try:
        for epoch in range(start, stop_after or cfg.epochs):
            trained.train()
            lam = lam_at(kd, epoch, cfg.epochs) if kd else 0.0
            shown = None if progress is None else not progress  # None: a bar only on a terminal
            bar = {"desc": f"{desc} {epoch + 1}/{cfg.epochs}", "disable": not group.main or shown}
            t0 = time.perf_counter()
            try:
                out = _train_epoch(forward, loss_call, train, cfg, opt, sched, generator, spec, teacher, lam, bar,
                                   (desc, epoch + 1))
            except DivergedError as e:
                checkpoints.wait()
                raise DivergedError(f"{e}; the last good checkpoint is kept at {last}") from None
            seconds, seen = time.perf_counter() - t0, out["images"]
            val_acc = split_accuracy(model, val, cfg.eval_batch_size)
            metrics = {"epoch": epoch + 1, **{f"loss_{k}": (v / seen).item() for k, v in out["sums"].items()},
                       "train_acc": (out["correct"] / seen).item(), "val_acc": val_acc, "lr": opt.param_groups[0]["lr"],
                       "lam": lam, "epoch_seconds": seconds, "images_per_second": seen / seconds}
            if test is not None:
                metrics["epoch_test_acc"] = split_accuracy(model, test, cfg.eval_batch_size)
            result.history.append(metrics)
            best_file = None
            if val_acc > result.best_val_acc:
                result.best_val_acc, result.best_epoch = val_acc, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best_file = {"run_key": run_key, "epoch": epoch + 1, "val_acc": val_acc, "model": best_state}
            checkpoints.save(_checkpoint(trained, opt, sched, generator, epoch + 1, result, run_key), best_file)
            if callback and group.main:
                callback(metrics)
    finally:
        checkpoints.close()
    if parallel and parallel.sync_batchnorm:
        plain_batchnorm(trained)  # saved, exported and evaluated as the plain model it is
    if best_state is None and best is not None:  # resumed after the best epoch
        best_state = group.broadcast(load_torch(best, map_location="cpu")["model"] if group.main and best.exists()
                                     else None)
        best_state = {k: v.to(device) for k, v in best_state.items()} if best_state is not None else None
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
