"""Deep-to-shallow self-distillation (Zhang et al. 2019, "Be Your Own Teacher"): auxiliary
exits on the network's own stages learn from its last layer. The exits are dropped when
training ends; what they leave is a better-trained network."""
from __future__ import annotations

import torch
from torch import nn

from engine.config import KDConfig
from engine.losses import Batch, DistillLoss, LossContext, kl_soft, register
from engine.losses.feature import num_classes, stage_shapes
from models.features import feature_names, with_features


def exit_head(channels: int, width: int, num_classes: int) -> nn.Module:
    """A small classifier on an intermediate stage: conv, BN, ReLU, global pool, linear."""
    return nn.Sequential(nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class WithExits(nn.Module):
    """The network plus one exit per stage but the last: (logits, {"exits": [E, B, C]})."""

    def __init__(self, model: nn.Module, stages: list[str], heads: nn.ModuleList):
        super().__init__()
        self.body, self.stages, self.heads = with_features(model, stages), stages, heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, feats = self.body(x)
        return logits, {"exits": torch.stack([h(feats[s]) for s, h in zip(self.stages, self.heads)])}


@register("self")
class SelfDistillation(DistillLoss):
    """(1 - alpha) * CE on the last layer, plus for every exit (1 - alpha) * CE + alpha * T^2 * KL(last || exit),
    the last layer held fixed in the KL: the paper's sum over every classifier, whose KL to itself is 0 (as
    pytorch-be-your-own-teacher weights it). The paper's feature-hint term is left out."""

    title = "self-distillation, deep to shallow (Zhang et al. 2019)"
    section, kd_objective = "self_distill", False
    needs_teacher = False

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        super().__init__()
        if ctx.student is None or ctx.sample is None:
            raise ValueError("self: it needs the student and a sample batch to place its exits")
        self.cfg = cfg.self_distill
        names = feature_names(ctx.student)
        shapes = stage_shapes(ctx.student, names, ctx.sample)
        self.stages = [n for n in names[:-1] if len(shapes[n]) == 3]
        if not self.stages:
            raise ValueError(f"self: {getattr(ctx.student, 'arch', 'the model')} has no intermediate stage "
                             f"({names}) to put an exit on")
        classes = num_classes(ctx.student, ctx.sample)
        width = shapes[names[-1]][0]
        self.heads = nn.ModuleList([exit_head(shapes[s][0], width, classes) for s in self.stages]).to(ctx.sample.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        return WithExits(model, self.stages, self.heads)

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        last, exits = batch.student_logits, batch.student_features["exits"].float()
        a, temp = self.cfg.alpha, self.cfg.temperature
        ce = batch.ce(last)
        exit_ce = torch.stack([batch.ce(e) for e in exits])
        exit_kl = torch.stack([kl_soft(e, last.detach(), temp) for e in exits]) * temp**2
        total = (1 - a) * ce + ((1 - a) * exit_ce + a * exit_kl).sum()
        return {"total": total, "ce": ce, "exit_ce": exit_ce.mean(), "kd": exit_kl.mean()}
