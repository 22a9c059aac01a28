"""Online distillation: deep mutual learning (Zhang et al. 2018). No pretrained teacher: the
student and its peers train together, each learning from the labels and from the others."""
from __future__ import annotations

import torch
from torch import nn

from engine.config import KDConfig
from engine.losses import Batch, DistillLoss, LossContext, kl_soft, register


class Cohort(nn.Module):
    """The student and its peers: returns the student's logits and every member's, [N, B, C]."""

    def __init__(self, student: nn.Module, peers: list[nn.Module]):
        super().__init__()
        self.student, self.peers = student, nn.ModuleList(peers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(x)
        return logits, {"cohort": torch.stack([logits, *(p(x) for p in self.peers)])}


@register("dml")
class DeepMutualLearning(DistillLoss):
    """Sum over the cohort of CE_i + weight * T^2 * mean_{j != i} KL(p_j || p_i), each p_j held
    fixed in member i's term, so every member gets exactly its own DML gradient from one
    backward pass. Only the student (the first member) is kept."""

    title = "DML (Zhang et al. 2018)"
    section, kd_objective = "dml", False
    needs_teacher = False

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        super().__init__()
        if ctx.build is None:
            raise ValueError("dml trains peers alongside the student: it needs a model builder")
        self.cfg = cfg.dml
        # Seeds apart from the student's: peers must not start as its copies.
        self.peer_models = [ctx.build(arch, ctx.seed + 7919 * (i + 1)) for i, arch in enumerate(self.cfg.peers)]

    def wrap(self, model: nn.Module) -> nn.Module:
        return Cohort(model, self.peer_models)

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        logits = batch.student_features["cohort"].float()
        temp, n = self.cfg.temperature, logits.shape[0]
        ces = [batch.ce(m) for m in logits]
        kls = [torch.stack([kl_soft(logits[i], logits[j].detach(), temp) for j in range(n) if j != i]).mean() * temp**2
               for i in range(n)]
        total = sum(ce + self.cfg.weight * kl for ce, kl in zip(ces, kls))
        return {"total": total, "ce": ces[0], "kd": kls[0], "peers_ce": torch.stack(ces[1:]).mean().detach()}
