"""Losses by name. Every loss returns its parts, and `total` is what is minimised.

A loss sees `Batch`: the student's logits (and features, when it names any), the teacher's
logits or None, and the labels. Feature and relation losses (FitNets, AT, RKD, SP) plug in
by listing `student_features` / `teacher_features` and reading `batch.*_features`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import KDConfig


@dataclass
class Batch:
    student_logits: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillLoss(nn.Module):
    """Interface. `lam` is the soft-term weight for the current epoch (see lam_at)."""

    needs_teacher = True
    student_features: tuple[str, ...] = ()
    teacher_features: tuple[str, ...] = ()

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class CrossEntropy(DistillLoss):
    needs_teacher = False

    def __init__(self, cfg: KDConfig | None = None):
        super().__init__()

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(batch.student_logits, batch.labels)
        return {"total": ce, "ce": ce}


def kl_soft(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), averaged over the batch. Teacher logits of -inf
    (classes a top-k cache did not keep) get probability 0 and add nothing."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


class HintonKD(DistillLoss):
    """(1 - lam) * CE(student, y) + lam * T^2 * KL(teacher_T || student_T).

    Teacher logits of shape [G, B, C] are G guides (DGKD): the KL is their mean, so lam
    keeps its meaning whatever the number of guides."""

    def __init__(self, cfg: KDConfig):
        super().__init__()
        self.temperature = cfg.temperature

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(batch.student_logits, batch.labels)
        t = batch.teacher_logits
        guides = t.unbind(0) if t.dim() == 3 else (t,)
        kd = torch.stack([kl_soft(batch.student_logits, g, self.temperature) for g in guides]).mean()
        kd = kd * self.temperature**2
        return {"total": (1 - lam) * ce + lam * kd, "ce": ce, "kd": kd}


LOSSES: dict[str, Callable[[KDConfig], DistillLoss]] = {"ce": CrossEntropy, "kd": HintonKD}


def build_loss(name: str, cfg: KDConfig) -> DistillLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](cfg)


def lam_at(cfg: KDConfig, epoch: int, epochs: int) -> float:
    """The soft-term weight at `epoch` (0-based): constant, or ramped from lam_start to lam."""
    start = cfg.lam if cfg.lam_start is None else cfg.lam_start
    if cfg.lam_schedule == "constant" or epochs <= 1:
        return cfg.lam
    frac = epoch / (epochs - 1)
    if cfg.lam_schedule == "cosine":
        frac = (1 - math.cos(math.pi * frac)) / 2
    return start + (cfg.lam - start) * frac
