"""Losses by name. Every loss returns its parts, and `total` is what is minimised.

A loss sees `Batch`: the student's logits and named features, the teacher's logits (or
None) and features, the labels and the epoch. A loss that needs more than logits says so:

- `student_features` / `teacher_features`: the stages it reads; the trainer wraps the
  student once (`wrap`) so one forward pass returns `(logits, {name: tensor})`, and the
  teacher's side comes from a cache or an online teacher with the same names.
- `wrap(model)`: the module the optimiser trains; extra networks (DML's peers, the
  auxiliary exits of self-distillation) live there and are dropped when training ends.
- its own parameters (FitNets' regressor) are optimised with the model's.

A new loss is one class plus `@register("name")`.
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
    teacher_logits: torch.Tensor | None = None  # [B, C], or [G, B, C] for several guides
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: float = 0.0  # 0-based, fractional within an epoch: for losses with their own warm-up or stages
    teacher_weights: torch.Tensor | None = None  # [G]: how much each guide counts
    label_smoothing: float = 0.0  # of every hard-label term (TrainConfig.label_smoothing)
    index: torch.Tensor | None = None  # [B]: each image's row in the training set (CRD's memory bank)

    def ce(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy with the labels, of the student's logits unless others are given."""
        return F.cross_entropy(self.student_logits if logits is None else logits, self.labels,
                               label_smoothing=self.label_smoothing)


@dataclass
class LossContext:
    """What a loss may need to set itself up: the student, the (first) teacher and an input
    batch to read feature shapes from, and a model builder for networks it trains alongside."""

    student: nn.Module | None = None
    teacher: nn.Module | None = None
    sample: torch.Tensor | None = None
    build: Callable[[str, int], nn.Module] | None = None
    seed: int = 0
    num_train: int = 0  # images in the training set (CRD's memory bank has a row for each)
    train_labels: torch.Tensor | None = None  # [num_train]: CRD draws its negatives from the other classes
    epochs: int = 0  # the run's schedule length (guides taken in sequence)


class DistillLoss(nn.Module):
    """Interface. `lam` is the soft-term weight for the current epoch (see lam_at)."""

    title = ""  # what tables call it
    needs_teacher = True
    section = ""  # its own settings: kd.<section>
    kd_objective = True  # builds on KD's (1 - lam) * CE + lam * T^2 * KL, so reads kd.lam and kd.temperature
    # False: it reads every class's teacher logit (a top-k cache, whose dropped classes are only
    # approximated, cannot serve it), or it needs the teacher on inputs no cache holds.
    serves_topk = True
    teacher_online = False  # True: runs the teacher itself on views it makes (MLKD's strong views)
    standardizes = False  # True: honours kd.standardize (logit standardization of its soft terms)
    # Over several processes (DDP) each computes the loss on its share of the batch. Per-image terms add up to
    # the whole batch's; a term over the batch is then a term over each share: say which ("" for none).
    batch_statistics = ""
    distributes = True  # False: refused over several processes (state that one process alone keeps right)
    student_features: tuple[str, ...] = ()
    teacher_features: tuple[str, ...] = ()

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def reduce_teacher(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What of the teacher's features the loss reads (and a cache keeps)."""
        return features

    def soft_temperature(self) -> float | None:
        """The temperature its soft term reads the teacher's logits at now (learned or fixed); None
        when no term softens them (a top-k cache's approximation grows with it)."""
        return None

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError


LOSSES: dict[str, type[DistillLoss]] = {}


def register(name: str):
    def deco(cls: type[DistillLoss]) -> type[DistillLoss]:
        LOSSES[name] = cls
        return cls

    return deco


def loss_settings(kd: KDConfig, name: str) -> dict:
    """The settings the loss `name` reads, flat ('dkd.beta': 8.0): for MLflow params and model cards."""
    cls = LOSSES[name]
    out = {"lam": kd.lam, "temperature": kd.temperature, "lam_schedule": kd.lam_schedule} if cls.kd_objective else {}
    if cls.standardizes:
        out["standardize"] = kd.standardize
    if cls.section:
        out |= {f"{cls.section}.{k}": v for k, v in getattr(kd, cls.section).model_dump().items()}
    return out


def build_loss(name: str, cfg: KDConfig | None, ctx: LossContext | None = None) -> DistillLoss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](cfg or KDConfig(), ctx or LossContext())


@register("ce")
class CrossEntropy(DistillLoss):
    title = "labels only"
    needs_teacher = False
    kd_objective = False

    def __init__(self, cfg: KDConfig | None = None, ctx: LossContext | None = None):
        super().__init__()

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        ce = batch.ce()
        return {"total": ce, "ce": ce}


def kl_soft(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    p = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean")


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardization (Sun et al. 2024): each row z-scored, so teacher and student are
    compared by how their logits relate, not by their range. The std is the unbiased one, with
    the authors' 1e-7 guard."""
    mean, std = logits.mean(-1, keepdim=True), logits.std(-1, keepdim=True)
    return (logits - mean) / (std + 1e-7)


def standardized(cfg: KDConfig, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits a soft term compares: z-scored when kd.standardize is set."""
    return (standardize(student), standardize(teacher.float())) if cfg.standardize else (student, teacher)


def lam_at(cfg: KDConfig, epoch: int, epochs: int) -> float:
    """The soft-term weight at `epoch` (0-based): constant, or ramped from lam_start to lam."""
    start = cfg.lam if cfg.lam_start is None else cfg.lam_start
    if cfg.lam_schedule == "constant" or epochs <= 1:
        return cfg.lam
    frac = epoch / (epochs - 1)
    if cfg.lam_schedule == "cosine":
        frac = (1 - math.cos(math.pi * frac)) / 2
    return start + (cfg.lam - start) * frac


# The families register themselves on import.
from engine.losses.logit import CTKD, DIST, DKD, HintonKD  # noqa: E402
from engine.losses import feature, relation, graph, adversarial, online, self_distill, multilevel, contrastive, review  # noqa: E402,F401

__all__ = ["Batch", "LossContext", "DistillLoss", "LOSSES", "register", "build_loss", "CrossEntropy", "HintonKD",
           "DKD", "DIST", "CTKD", "kl_soft", "lam_at", "standardize"]
