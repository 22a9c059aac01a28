"""Adversarial distillation: a discriminator learns to tell the teacher's logits from the student's,
and the student learns to match the teacher and to fool the discriminator.

The discriminator and its loss follow MEAL V2 (Shen & Savvides 2020, szq0214/MEAL-V2): three 1x1
convolutions on the logits (here the same maps as linear layers) with ReLUs between, the last to
two scores (MEAL V2 puts a ReLU on those too: `final_relu`), scored by BCE with logits against
[1, 0] for the student's rows and [0, 1] for the teacher's. MEAL V2's code (like MEAL's) minimises
that loss jointly over the student and the discriminator, which its authors call a regulariser;
`game: fool` reverses the discriminator's gradient into the student (Ganin & Lempitsky 2015), the
two-player game the method is named for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import KDConfig
from engine.losses import Batch, DistillLoss, LossContext, register
from engine.losses.feature import num_classes
from engine.losses.logit import HintonKD, _guides, _Reverse


class Discriminator(nn.Module):
    """Logits [B, C] -> two scores [B, 2], through widths C, C // k, C // k^2, 2 (each at least 2), a
    ReLU after each hidden layer, and after the last only with `final_relu` (MEAL V2's)."""

    def __init__(self, classes: int, shrink: int, final_relu: bool = False):
        super().__init__()
        widths = [classes, max(classes // shrink, 2), max(classes // shrink**2, 2), 2]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.final_relu = final_relu

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            z = layer(z)
            z = F.relu(z) if i < len(self.layers) - 1 or self.final_relu else z
        return z


def discriminator_loss(d: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """BCE with logits of d on [student; teacher] against [1, 0] (student) and [0, 1] (teacher)."""
    is_teacher = torch.cat([torch.zeros(len(student)), torch.ones(len(teacher))]).to(student.device)
    target = torch.stack([1 - is_teacher, is_teacher], 1)
    return F.binary_cross_entropy_with_logits(d(torch.cat([student, teacher])), target)


@register("adversarial")
class AdversarialKD(DistillLoss):
    """KD's objective + weight * the discriminator's loss on the student's and the (first) teacher's logits."""
    batch_statistics = ""

    title = "adversarial KD (MEAL V2 discriminator)"
    section = "adversarial"
    standardizes = True  # its KD term's
    serves_topk = False  # the discriminator reads every class's logit

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        super().__init__()
        if ctx.student is None or ctx.sample is None:
            raise ValueError("loss 'adversarial' sizes its discriminator by the student's outputs: it needs the "
                             "student and a sample batch")
        self.kd, self.cfg = HintonKD(cfg), cfg.adversarial
        classes = num_classes(ctx.student, ctx.sample)
        self.discriminator = Discriminator(classes, self.cfg.shrink, self.cfg.final_relu).to(ctx.sample.device)

    def soft_temperature(self) -> float | None:
        return self.kd.soft_temperature()

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        parts = self.kd(batch, lam)
        student = batch.student_logits.float()
        if self.cfg.game == "fool":
            student = _Reverse.apply(student, 1.0)
        adv = discriminator_loss(self.discriminator, student, _guides(batch)[0][0].float().detach())
        return {**parts, "total": parts["total"] + self.cfg.weight * adv, "adversarial": adv}
