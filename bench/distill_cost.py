"""What a distillation loss adds to a training epoch of the same student: a KD epoch from cached soft targets
against a label-only epoch (the distillation's own overhead; limit 1.0, goal 1.05); against that KD epoch, the
teacher run online on a fresh view every step, and CRD and ReviewKD epochs (goal for CRD: 2.0).

Each epoch is one `fit` call of the trainer, the student plain-2 (the default profile's) and the teacher air-32
(untrained: the cost does not depend on its weights) on the same images, batches and seed; teacher logits and
features cached as the pipeline caches them. CRD's memory bank has a row per image of the whole training split,
as in the pipeline, and is scored two ways: its matrix product with the whole bank (ours) and the reference's
gather of each anchor's rows (`crd-gather`, what RepDistiller's and mdistiller's code do). Runs alternate
(one of each arm, then again), and each ratio is the median over those rounds of the paired ratios.
"""
from __future__ import annotations

import statistics
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Context, timed
from engine import augment, soft_targets
from engine.config import KDConfig, TrainConfig
from engine.losses import Batch, LossContext, build_loss, contrastive
from engine.soft_targets import Targets
from engine.trainer import Teacher, fit

GOALS = {"kd": 1.05, "crd": 2.0}
TEACHER, STUDENT = "air-32", "plain-2"
TRAIN_IMAGES, BATCH, VIEWS = 10_000, 128, 2
ARMS = ("ce", "kd", "kd-online", "crd", "crd-gather", "reviewkd")
AGAINST = {"kd": "ce", "kd-online": "kd", "crd": "kd", "crd-gather": "kd", "reviewkd": "kd"}


@contextmanager
def gathered():
    """CRD scored as the reference scores it: each anchor's rows gathered, never the whole bank."""
    factor = contrastive.WHOLE_BANK_FACTOR
    contrastive.WHOLE_BANK_FACTOR = 0
    try:
        yield
    finally:
        contrastive.WHOLE_BANK_FACTOR = factor


class Arms:
    """Every arm's loss and teacher, built once; `epoch(arm)` trains a fresh student for one epoch."""

    def __init__(self, ctx: Context, n: int):
        self.ctx, self.train, self.val = ctx, ctx.device_set("train", n), ctx.device_set("val", max(16, n // 9))
        self.full = ctx.device_set("train")  # CRD's bank: a row per image of the whole split, as in the pipeline
        self.teacher = ctx.model(TEACHER).eval()
        spec = ctx.splits.augment
        self.views = augment.fixed_views(n, spec, 0, VIEWS).to(ctx.device)
        self.cache = soft_targets.compute(self.teacher, self.train, spec, VIEWS, 0, None)
        self.features: dict[str, object] = {}

    def loss(self, arm: str):
        name = arm.split("-")[0]
        cfg = KDConfig(loss=name, lam=0.0) if name in ("crd", "reviewkd") else KDConfig()
        lc = LossContext(student=self.ctx.model(STUDENT, seed=1), teacher=self.teacher,
                         sample=self.train.normalize(self.train.x[:8]), seed=0, num_train=len(self.full),
                         train_labels=self.full.y)
        return build_loss(name, cfg, lc), cfg

    def source(self, arm: str, loss) -> Teacher | None:
        if arm == "ce":
            return None
        if arm == "kd-online":  # the cache-views experiment's online arm: a fresh view each step, the teacher run on it
            return Teacher(soft_targets.OnlineTeacher(self.teacher), None)
        if not loss.teacher_features:
            return Teacher(self.cache, self.views)
        if arm.split("-")[0] not in self.features:  # computed once, outside the timed epochs, as a training does
            self.features[arm.split("-")[0]] = soft_targets.compute_features(
                self.teacher, self.train, self.ctx.splits.augment, VIEWS, 0, loss.teacher_features,
                loss.reduce_teacher)
        return Teacher(soft_targets.CachedFeatures(self.cache, self.features[arm.split("-")[0]]), self.views)

    def step_gflops(self, arm: str) -> float:
        """FLOPs of one training step (student forward, loss, backward) by torch.utils.flop_counter: what the arm's
        arithmetic asks, beside what its epoch takes (a gather is memory traffic, which no FLOP count shows)."""
        loss, cfg = self.loss(arm)
        teacher, model = self.source(arm, loss), loss.wrap(self.ctx.model(STUDENT, seed=1))
        idx = torch.arange(min(BATCH, len(self.train)), device=self.ctx.device)
        x = self.train.normalize(self.train.x[idx])
        with FlopCounterMode(display=False) as counter, (gathered() if arm == "crd-gather" else nullcontext()):
            t = Targets.of(teacher.targets(idx, torch.zeros_like(idx), x) if teacher else None)
            out = model(x)
            logits, feats = out if isinstance(out, tuple) else (out, {})
            batch = Batch(logits, self.train.y[idx], t.logits, feats, t.features, index=idx)
            loss(batch, cfg.lam)["total"].backward()
        return counter.get_total_flops() / 1e9

    def epoch(self, arm: str) -> float:
        loss, cfg = self.loss(arm)
        teacher = self.source(arm, loss)
        student = self.ctx.model(STUDENT, seed=1)
        run = lambda: fit(student, self.train, self.val, TrainConfig(epochs=1, batch_size=BATCH), loss,
                          torch.Generator().manual_seed(0), self.ctx.splits.augment,
                          kd=cfg if teacher else None, teacher=teacher, run_key="bench")
        if arm == "crd-gather":
            with gathered():
                return timed(self.ctx, run)
        return timed(self.ctx, run)


def run(ctx: Context) -> dict:
    arms = Arms(ctx, ctx.images(TRAIN_IMAGES))
    for arm in ARMS:  # warm-up: allocators, kernels, the feature caches
        arms.epoch(arm)
    runs: dict[str, list[float]] = {a: [] for a in ARMS}
    for _ in range(ctx.repeats):
        for arm in ARMS:
            runs[arm].append(arms.epoch(arm))
    rows = []
    for arm in ARMS:
        row = {"arm": arm, "student": STUDENT, "teacher": TEACHER, "train_images": len(arms.train),
               "bank_rows": len(arms.full) if arm.startswith("crd") else None,
               "step_gflop": arms.step_gflops(arm), "epoch_s": statistics.median(runs[arm]),
               "runs_s": [round(r, 3) for r in runs[arm]]}
        if arm in AGAINST:
            paired = sorted(a / b for a, b in zip(runs[arm], runs[AGAINST[arm]]))
            row |= {"against": AGAINST[arm], "ratio": statistics.median(paired),
                    "ratio_range": f"{paired[0]:.2f}-{paired[-1]:.2f}",
                    "flops_ratio": row["step_gflop"] / rows[ARMS.index(AGAINST[arm])]["step_gflop"]}
        rows.append(row)
        ctx.log(f"  {arm}: {row['epoch_s']:.2f} s/epoch" + (f", {row['ratio']:.2f}x {row['against']}" if arm in AGAINST else ""))
    ratio = {r["arm"]: r["ratio"] for r in rows if "ratio" in r}
    return {"rows": rows, "summary": {
        "kd_over_ce": ratio["kd"], "kd_goal": GOALS["kd"], "kd_met": ratio["kd"] <= GOALS["kd"],
        "crd_over_kd": ratio["crd"], "crd_goal": GOALS["crd"], "crd_met": ratio["crd"] <= GOALS["crd"],
        "crd_gather_over_kd": ratio["crd-gather"], "reviewkd_over_kd": ratio["reviewkd"],
        "online_over_kd": ratio["kd-online"]}}
