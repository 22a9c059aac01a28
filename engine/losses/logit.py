"""Logit-based losses: Hinton's KD (one teacher, several guides, or an ensemble), DKD, DIST and
CTKD. KD, DKD and CTKD take logit standardization as an option (`kd.standardize`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import KDConfig
from engine.losses import Batch, DistillLoss, LossContext, kl_soft, register, standardized


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
    'kl', the weighted mean of the KLs to each, 'probs', the KL to the weighted mixture of
    their softened probabilities, or 'sequence', each guide alone for an equal share of the
    run's epochs, in the order given (progressive distillation from a teacher's checkpoints).
    Either way lam keeps its meaning whatever the guide count.
    With `standardize`, both sides are z-scored first; CE still reads the raw logits."""

    title = "KD (Hinton et al. 2015)"
    standardizes = True

    def __init__(self, cfg: KDConfig, ctx: LossContext | None = None):
        super().__init__()
        self.temperature = cfg.temperature
        self.combine = cfg.ensemble.combine
        self.cfg = cfg
        self.serves_topk = not cfg.standardize  # a z-score needs every class's logit
        self.epochs = ctx.epochs if ctx else 0

    def in_turn(self, epoch: float, guides: int) -> int:
        """combine 'sequence': the guide whose share of the run's epochs `epoch` (0-based) falls in."""
        if self.epochs < 1:
            raise ValueError("kd.ensemble.combine 'sequence' shares the run's epochs among the guides: the loss "
                             "needs LossContext.epochs")
        return min(int(epoch * guides / self.epochs), guides - 1)

    def soft_temperature(self) -> float | None:
        return self.temperature

    def soft_term(self, batch: Batch, temp: float | torch.Tensor | None = None) -> torch.Tensor:
        t, w = _guides(batch)
        if self.combine == "sequence" and t.shape[0] > 1:
            w = torch.zeros_like(w).index_fill_(0, torch.tensor(self.in_turn(batch.epoch, t.shape[0]), device=w.device), 1.0)
        temp = self.temperature if temp is None else temp
        s, t = standardized(self.cfg, batch.student_logits, t)
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
    distributions over the non-target classes alone. `warm` = min(epoch / warmup_epochs, 1), with
    the epoch counted fractionally from 0: mdistiller counts from 1 (min(epoch / warmup, 1) with
    epoch = 1 in the first), so ours ramps one epoch behind theirs. DKD has its own temperature
    and ignores lam, as in the paper. NCKD is the teacher's distribution over the non-target
    classes: a top-k cache drops most of it, so DKD refuses one (serves_topk)."""

    title = "DKD (Zhao et al. 2022)"
    standardizes = True
    section, kd_objective = "dkd", False
    serves_topk = False

    def __init__(self, cfg: KDConfig, ctx: LossContext | None = None):
        super().__init__()
        self.cfg, self.kd = cfg.dkd, cfg

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        y, temp = batch.labels, self.cfg.temperature
        s, t = standardized(self.kd, batch.student_logits, batch.teacher_logits.float())
        target = F.one_hot(y, s.shape[1]).bool()
        p_s, p_t = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)

        def binary(p: torch.Tensor) -> torch.Tensor:
            pt = (p * target).sum(1, keepdim=True)
            return torch.cat([pt, 1 - pt], dim=1).clamp_min(1e-12)

        tckd = F.kl_div(binary(p_s).log(), binary(p_t), reduction="batchmean") * temp**2
        # Masking the target with a large negative logit leaves a softmax over the other classes.
        nckd = F.kl_div(F.log_softmax(s / temp - 1000.0 * target, dim=1), F.softmax(t / temp - 1000.0 * target, dim=1),
                        reduction="batchmean") * temp**2
        ce = batch.ce(batch.student_logits)
        warm = min(batch.epoch / self.cfg.warmup_epochs, 1.0)
        soft = self.cfg.alpha * tckd + self.cfg.beta * nckd
        return {"total": ce + warm * soft, "ce": ce, "tckd": tckd, "nckd": nckd}


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: [rows]."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@register("dist")
class DIST(DistillLoss):
    """DIST (Huang et al. 2022): CE + T^2 * (beta * inter + gamma * intra) on p = softmax(z / T).
    inter = 1 - mean over images of the Pearson correlation of the student's and the teacher's
    class scores; intra = the same over classes, each class's scores across the batch. Only the
    relations must match, not the values, which suits a teacher much larger than the student.
    Correlations need every class: a top-k cache cannot serve it."""
    batch_statistics = "the intra-class relation (each class's scores across the batch)"

    title = "DIST (Huang et al. 2022)"
    section, kd_objective = "dist", False
    serves_topk = False

    def __init__(self, cfg: KDConfig, ctx: LossContext | None = None):
        super().__init__()
        self.cfg = cfg.dist

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        temp = self.cfg.temperature
        p_s = F.softmax(batch.student_logits / temp, dim=1)
        p_t = F.softmax(batch.teacher_logits.float() / temp, dim=1)
        inter = (1 - pearson(p_s, p_t).mean()) * temp**2
        intra = (1 - pearson(p_s.T, p_t.T).mean()) * temp**2
        ce = batch.ce()
        return {"total": ce + self.cfg.beta * inter + self.cfg.gamma * intra, "ce": ce, "inter": inter, "intra": intra}


class _Reverse(torch.autograd.Function):
    """Identity forward; the gradient times -scale backward (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


@register("ctkd")
class CTKD(HintonKD):
    """Curriculum temperature KD (Li et al. 2023): KD whose temperature is learned adversarially.
    T = t_start + t_range * sigmoid(t), t a global parameter trained with the model, behind a
    gradient reversal whose weight rises (cosine) from lambda_min to lambda_max over
    curriculum_epochs: the temperature moves to make the soft term harder, more so as training
    goes on. t starts at 1 as in the authors' code (T = 15.6 with the defaults)."""

    title = "CTKD (Li et al. 2023)"
    section = "ctkd"

    def __init__(self, cfg: KDConfig, ctx: LossContext | None = None):
        super().__init__(cfg, ctx)
        self.ct = cfg.ctkd
        self.t = nn.Parameter(torch.ones(1))

    def reversal(self, epoch: float) -> float:
        """The weight at this (0-based, fractional) epoch: a step per epoch, counted from 1 as the
        authors' loop does (their epoch 1 already has cos(pi / curriculum) of the way done)."""
        frac = min((math.floor(epoch) + 1) / self.ct.curriculum_epochs, 1.0)
        return self.ct.lambda_min + (self.ct.lambda_max - self.ct.lambda_min) * (1 - math.cos(math.pi * frac)) / 2

    def soft_temperature(self) -> float | None:
        with torch.no_grad():
            return float(self.ct.t_start + self.ct.t_range * torch.sigmoid(self.t))

    def temperature_at(self, epoch: float) -> torch.Tensor:
        t = _Reverse.apply(self.t, self.reversal(epoch))
        return self.ct.t_start + self.ct.t_range * torch.sigmoid(t)

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        temp = self.temperature_at(batch.epoch).to(batch.student_logits.device)
        ce = batch.ce()
        kd = self.soft_term(batch, temp)
        return {"total": (1 - lam) * ce + lam * kd, "ce": ce, "kd": kd, "temperature": temp.detach().squeeze()}
