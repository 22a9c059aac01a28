"""Logit-based losses: Hinton's KD (one teacher, several guides, or an ensemble) and DKD."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import KDConfig
from engine.losses import Batch, DistillLoss, LossContext, kl_soft, register


def _guides(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits as [G, B, C] and their weights [G], summing to 1."""
    t = batch.teacher_logits
    t = t if t.dim() == 3 else t.unsqueeze(0)
    w = batch.teacher_weights
    w = torch.ones(t.shape[0], device=t.device) if w is None else w.to(t.device, torch.float32)
    return t, w / w.sum()


@register("kd")
class HintonKD(DistillLoss):
    """(1 - lam) * CE(student, y) + lam * T^2 * KL(teacher_T || student_T).

    Several guides ([G, B, C], DGKD or a multi-teacher ensemble) combine by `ensemble.combine`:
    'kl', the weighted mean of the KLs to each, or 'probs', the KL to the weighted mixture of
    their softened probabilities. Either way lam keeps its meaning whatever the guide count."""

    title = "KD (Hinton et al. 2015)"

    def __init__(self, cfg: KDConfig, ctx: LossContext | None = None):
        super().__init__()
        self.temperature = cfg.temperature
        self.combine = cfg.ensemble.combine

    def soft_term(self, batch: Batch) -> torch.Tensor:
        t, w = _guides(batch)
        s, temp = batch.student_logits, self.temperature
        if self.combine == "probs" and t.shape[0] > 1:
            mixture = (w[:, None, None] * F.softmax(t.float() / temp, dim=2)).sum(0)
            kd = F.kl_div(F.log_softmax(s / temp, dim=1), mixture, reduction="batchmean")
        else:
            kd = (w * torch.stack([kl_soft(s, g, temp) for g in t.unbind(0)])).sum()
        return kd * temp**2

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        ce = batch.ce()
        kd = self.soft_term(batch)
        return {"total": (1 - lam) * ce + lam * kd, "ce": ce, "kd": kd}


@register("dkd")
class DKD(DistillLoss):
    """Decoupled KD (Zhao et al. 2022): CE + warm * (alpha * TCKD + beta * NCKD), both * T^2.

    TCKD is the KL between the binary (target, rest) distributions; NCKD the KL between the
    distributions over the non-target classes alone. `warm` = min(epoch / warmup_epochs, 1), the
    epoch counted fractionally from 0, so the KD terms ramp in step by step.
    DKD has its own temperature and ignores lam, as in the paper."""

    title = "DKD (Zhao et al. 2022)"
    section, kd_objective = "dkd", False

    def __init__(self, cfg: KDConfig, ctx: LossContext | None = None):
        super().__init__()
        self.cfg = cfg.dkd

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        s, t, y, temp = batch.student_logits, batch.teacher_logits.float(), batch.labels, self.cfg.temperature
        target = F.one_hot(y, s.shape[1]).bool()
        p_s, p_t = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)

        def binary(p: torch.Tensor) -> torch.Tensor:
            pt = (p * target).sum(1, keepdim=True)
            return torch.cat([pt, 1 - pt], dim=1).clamp_min(1e-12)

        tckd = F.kl_div(binary(p_s).log(), binary(p_t), reduction="batchmean") * temp**2
        # Masking the target with a large negative logit leaves a softmax over the other classes.
        nckd = F.kl_div(F.log_softmax(s / temp - 1000.0 * target, dim=1), F.softmax(t / temp - 1000.0 * target, dim=1),
                        reduction="batchmean") * temp**2
        ce = batch.ce(s)
        warm = min(batch.epoch / self.cfg.warmup_epochs, 1.0)
        soft = self.cfg.alpha * tckd + self.cfg.beta * nckd
        return {"total": ce + warm * soft, "ce": ce, "tckd": tckd, "nckd": nckd}
