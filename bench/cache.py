"""A distillation epoch with cached soft targets against one with the teacher online.

Both read the same fixed views, so the student sees identical inputs and targets. Two
expectations for the ratio online / cached:
- by FLOPs: 1 + teacher forward FLOPs / student training FLOPs (torch.utils.flop_counter);
- by time: 1 + measured teacher forward time / measured cached epoch time, which is what
  removing the teacher can save on this machine, where FLOPs of small and large
  convolutions do not cost the same time.
"""
from __future__ import annotations

import statistics

import torch

from bench.common import Context, run_fit, timed
from engine import augment, soft_targets
from engine.trainer import Teacher
from models.profile import flops_per_image, train_flops_per_image

GOAL = 0.90
PAIRS = [("plain-10", "plain-2"), ("plain-10", "plain-4"), ("plain-4", "plain-2")]
TRAIN_IMAGES, BATCH, VIEWS = 10_000, 128, 2


def distill_epoch(ctx: Context, student_arch: str, n: int, teacher: Teacher) -> float:
    train, val = ctx.device_set("train", n), ctx.device_set("val", max(16, n // 9))
    return run_fit(ctx, ctx.model(student_arch, seed=1), train, val, batch=BATCH, teacher=teacher)[0]


@torch.no_grad()
def teacher_forward(ctx: Context, model, n: int, views: augment.Views) -> float:
    """The work an online teacher adds: forward passes over the student's batches of views."""
    train, spec = ctx.device_set("train", n), ctx.splits.augment
    model.eval()

    def passes():
        for idx in torch.arange(n, device=ctx.device).split(BATCH):
            model(train.normalize(augment.apply(train.x[idx], views[0, idx], spec)))

    return timed(ctx, passes)


def measure(ctx: Context, teacher_arch: str, student_arch: str, n: int) -> dict:
    teacher_model, spec = ctx.model(teacher_arch), ctx.splits.augment
    views = augment.fixed_views(n, spec, 0, VIEWS).to(ctx.device)
    cached = Teacher(soft_targets.compute(teacher_model, ctx.device_set("train", n), spec, VIEWS, 0, None), views)
    online = Teacher(soft_targets.OnlineTeacher(teacher_model), views)
    distill_epoch(ctx, student_arch, n, cached)  # warm-up
    runs = {"cached": [], "online": [], "teacher": []}
    for _ in range(ctx.repeats):  # alternating, so drift hits both
        runs["cached"].append(distill_epoch(ctx, student_arch, n, cached))
        runs["online"].append(distill_epoch(ctx, student_arch, n, online))
        runs["teacher"].append(teacher_forward(ctx, teacher_model, n, views))
    cached_s, online_s, teacher_s = (statistics.median(runs[k]) for k in ("cached", "online", "teacher"))
    shape = ctx.splits.input_shape
    by_flops = 1 + flops_per_image(teacher_model, shape) / train_flops_per_image(ctx.model(student_arch), shape)
    by_time = 1 + teacher_s / cached_s
    measured = online_s / cached_s
    return {"teacher": teacher_arch, "student": student_arch, "train_images": n, "cached_epoch_s": cached_s,
            "online_epoch_s": online_s, "teacher_forward_s": teacher_s, "measured_ratio": measured,
            "expected_by_flops": by_flops, "share_of_flops_expectation": measured / by_flops,
            "expected_by_time": by_time, "share_of_time_expectation": measured / by_time}


def run(ctx: Context) -> dict:
    rows = []
    for teacher_arch, student_arch in PAIRS:
        row = measure(ctx, teacher_arch, student_arch, ctx.images(TRAIN_IMAGES))
        ctx.log(f"  {teacher_arch} -> {student_arch}: online/cached {row['measured_ratio']:.2f}x "
                f"(FLOPs expect {row['expected_by_flops']:.2f}x, time expects {row['expected_by_time']:.2f}x)")
        rows.append(row)
    return {"rows": rows, "summary": {
        "goal": GOAL, "worst_share_of_flops_expectation": min(r["share_of_flops_expectation"] for r in rows),
        "worst_share_of_time_expectation": min(r["share_of_time_expectation"] for r in rows),
        "met_by_flops": all(r["share_of_flops_expectation"] >= GOAL for r in rows),
        "met_by_time": all(r["share_of_time_expectation"] >= GOAL for r in rows)}}
