"""Our trainer against the bare loop, same model, batch, data and device.

The trainer runs as the pipeline runs it: MLflow logging every epoch, the progress bar
forced on, epoch checkpoints, best-on-validation tracking. Both sides end every epoch with
a validation accuracy pass, and both run without augmentation so only overhead differs.
Runs alternate (trainer, bare, trainer, bare, ...) so drift in the machine hits both; the
ratio is the median over those adjacent pairs of bare time / trainer time.
"""
from __future__ import annotations

import statistics
import warnings

import torch
import torch.nn.functional as F

from bench.bare_loop import bare_fit, prepare
from bench.common import NO_AUGMENT, Context, mlflow_run, run_fit, timed
from engine.config import AugmentConfig, KDConfig, TrainConfig
from engine.losses import Batch, build_loss
from engine.trainer import _batch, make_optimizer, predict

GOAL = 0.95
CASES = [("plain-2", 20_000), ("plain-4", 10_000), ("plain-10", 4_000)]  # (arch, train images) at scale 1
EPOCHS, BATCH = 2, 128


def val_size(n: int) -> int:
    return max(16, n // 9)  # the pipeline's proportion: 10% of train is held out


def trainer_run(ctx: Context, arch: str, n: int, *, epochs: int = EPOCHS, batch: int = BATCH, compile: bool = False,
                spec: AugmentConfig = NO_AUGMENT, logger=None) -> float:
    """Wall seconds of one whole `fit` call on a fresh model and a fresh checkpoint dir."""
    train, val = ctx.device_set("train", n), ctx.device_set("val", val_size(n))
    return run_fit(ctx, ctx.model(arch), train, val, epochs=epochs, batch=batch, compile=compile, spec=spec,
                   logger=logger, checkpoints=True)[0]


def bare_run(ctx: Context, arch: str, n: int, *, epochs: int = EPOCHS, batch: int = BATCH, compile: bool = False) -> float:
    x, y = prepare(ctx.device_set("train", n), ctx.device)
    x_val, y_val = prepare(ctx.device_set("val", val_size(n)), ctx.device)
    model = ctx.model(arch)
    return timed(ctx, lambda: bare_fit(model, x, y, x_val, y_val, epochs, batch, compile=compile))


def compare(ctx: Context, arch: str, n: int, *, compile: bool = False, epochs: int = EPOCHS, batch: int = BATCH) -> dict:
    """Trainer and bare loop, alternating, after one untimed warm-up of each."""
    with mlflow_run(ctx.workdir) as logger:
        runs = {"trainer": [], "bare": []}
        for i in range(ctx.repeats + 1):
            t = trainer_run(ctx, arch, n, epochs=epochs, batch=batch, compile=compile, logger=logger)
            b = bare_run(ctx, arch, n, epochs=epochs, batch=batch, compile=compile)
            if i:  # the first pair warms caches, allocators and compilers
                runs["trainer"].append(t)
                runs["bare"].append(b)
    images = n * epochs
    trainer_s, bare_s = statistics.median(runs["trainer"]), statistics.median(runs["bare"])
    paired = sorted(b / t for t, b in zip(runs["trainer"], runs["bare"]))  # neighbours share the machine's state
    return {"model": arch, "train_images": n, "epochs": epochs, "batch": batch, "compile": compile,
            "trainer_img_s": images / trainer_s, "bare_img_s": images / bare_s, "ratio": statistics.median(paired),
            "ratio_range": f"{paired[0]:.2f}-{paired[-1]:.2f}",
            "trainer_runs_s": [round(r, 3) for r in runs["trainer"]], "bare_runs_s": [round(r, 3) for r in runs["bare"]]}


def bookkeeping(ctx: Context, arch: str = "plain-2", batch: int = BATCH, calls: int = 500) -> dict:
    """Microseconds per step of what the trainer adds around the model (batch by index with
    per-batch normalisation, loss parts, running sums, accuracy count, finiteness check, LR
    step), against one model step: the trainer's steady-state overhead, free of run-to-run noise."""
    train, model, gen = ctx.device_set("train", batch), ctx.model(arch), torch.Generator().manual_seed(0)
    opt, sched = make_optimizer(model, TrainConfig(), 1000)
    idx = torch.arange(len(train), device=ctx.device)
    x_bare, y = train.normalize(train.x[idx]), train.y[idx]
    logits, loss_fn, sums = model(x_bare).detach(), build_loss("ce", KDConfig()), {}

    def ours():
        _batch(train, idx, train.x[idx], NO_AUGMENT, gen, None, len(idx), slice(None))
        parts = loss_fn(Batch(logits.float(), y, None), 0.0)
        bool(torch.isfinite(parts["total"]))
        sched.step()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v.detach() * batch
        (logits.argmax(1) == y).sum()

    def step():
        loss = F.cross_entropy(model(x_bare), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with warnings.catch_warnings():  # LR steps without optimizer steps are the point here
        warnings.simplefilter("ignore", UserWarning)
        extra = timed(ctx, lambda: [ours() for _ in range(calls)]) / calls
    bare_index = timed(ctx, lambda: [x_bare[idx] for _ in range(calls)]) / calls
    model_step = timed(ctx, lambda: [step() for _ in range(calls // 10)]) / (calls // 10)
    return {"model": arch, "added_us_per_step": (extra - bare_index) * 1e6, "model_step_us": model_step * 1e6,
            "added_share": (extra - bare_index) / model_step, "batch": len(train)}


def epoch_fixed_cost(ctx: Context, arch: str = "plain-2", n: int = 20_000) -> float:
    """Milliseconds per epoch that `fit` spends outside its step loop and validation pass (MLflow
    write, checkpoint snapshot, progress bar): median over the repeats."""
    n = ctx.images(n)
    train, val = ctx.device_set("train", n), ctx.device_set("val", val_size(n))
    costs = []
    with mlflow_run(ctx.workdir) as logger:
        for _ in range(ctx.repeats):
            model = ctx.model(arch)
            wall, result = run_fit(ctx, model, train, val, epochs=EPOCHS, spec=NO_AUGMENT, logger=logger, checkpoints=True)
            val_s = timed(ctx, lambda: predict(model, val))
            steps = sum(h["epoch_seconds"] for h in result.history)
            costs.append((wall - steps - EPOCHS * val_s) / EPOCHS * 1000)
    return statistics.median(costs)


def run(ctx: Context) -> dict:
    rows = []
    for arch, n in CASES:
        row = compare(ctx, arch, ctx.images(n))
        ctx.log(f"  {arch}: trainer {row['trainer_img_s']:.0f} img/s, bare {row['bare_img_s']:.0f} img/s, ratio {row['ratio']:.3f}")
        rows.append(row)
    augmented = [trainer_run(ctx, "plain-2", ctx.images(CASES[0][1]), spec=ctx.splits.augment) for _ in range(ctx.repeats)]
    aug_cost = statistics.median(augmented) / (rows[0]["train_images"] * EPOCHS / rows[0]["trainer_img_s"])
    worst = min(r["ratio"] for r in rows)
    steady = bookkeeping(ctx)
    return {"rows": rows, "summary": {"worst_ratio": worst, "goal": GOAL, "met": worst >= GOAL,
                                      "plain2_augmentation_time_factor": aug_cost,
                                      "plain2_bookkeeping_us_per_step": steady["added_us_per_step"],
                                      "plain2_model_step_us": steady["model_step_us"],
                                      "plain2_bookkeeping_share_of_step": steady["added_share"],
                                      "plain2_fixed_ms_per_epoch": epoch_fixed_cost(ctx),
                                      "plain2_epoch_s": rows[0]["train_images"] / rows[0]["trainer_img_s"]}}
