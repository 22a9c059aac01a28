"""Final report for one model on the test split: accuracy, per class, cost, speed, agreement."""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from engine.feed import DeviceSet
from engine.trainer import predict
from models.profile import profile


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def cpu_speed(model: nn.Module, input_shape: tuple[int, int, int], repeats: int = 20) -> dict[str, float]:
    """Median latency at batch 1 and median throughput at batch 256, on the CPU."""
    m = copy.deepcopy(model).cpu().eval().to(memory_format=torch.channels_last)
    one = torch.randn(1, *input_shape).contiguous(memory_format=torch.channels_last)
    many = torch.randn(256, *input_shape).contiguous(memory_format=torch.channels_last)
    latency = median_seconds(lambda: m(one), repeats)
    batch = median_seconds(lambda: m(many), max(3, repeats // 4))
    return {"latency_ms_b1": latency * 1000, "throughput_b256": 256 / batch}


def evaluate(model: nn.Module, test: DeviceSet, classes: list[str], teacher_pred: torch.Tensor | None = None,
             speed_repeats: int = 20) -> dict:
    logits = predict(model, test)
    pred, y, c = logits.argmax(1), test.y, len(classes)
    confusion = torch.zeros(c, c, dtype=torch.long, device=y.device)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp_min(1)).tolist()
    out = {"test_acc": (pred == y).float().mean().item(), "num_test": len(y),
           "per_class_acc": dict(zip(classes, per_class)), "confusion": confusion.tolist()}
    if c >= 10:
        out["test_top5"] = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    if teacher_pred is not None:
        out["teacher_agreement"] = (pred == teacher_pred.to(pred.device)).float().mean().item()
    input_shape = tuple(test.x.shape[1:])
    out.update(profile(model, input_shape))
    if speed_repeats:
        out.update(cpu_speed(model, input_shape, speed_repeats))
    return out
