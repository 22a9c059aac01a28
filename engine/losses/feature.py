"""Feature-based losses: FitNets (a hint layer and a learned regressor) and attention transfer.

Both compare student and teacher stages. Unless `kd.student_layers` / `kd.teacher_layers`
name them, each student stage is paired with the deepest teacher stage of the same spatial
size (plain-2's two stages with plain-10's first two, say).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import KDConfig
from engine.losses import Batch, DistillLoss, LossContext, register
from engine.losses.logit import HintonKD
from models.features import feature_names, with_features


@torch.no_grad()
def num_classes(model: nn.Module, sample: torch.Tensor) -> int:
    """The model's output width, read from one eval-mode forward pass."""
    was = model.training
    model.eval()
    n = model(sample[:2]).shape[1]
    model.train(was)
    return n


@torch.no_grad()
def stage_shapes(model: nn.Module, names: list[str], sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-image shape of each named feature, read from one eval-mode forward pass."""
    was = model.training
    model.eval()
    _, feats = with_features(model, names)(sample[:2])
    model.train(was)
    return {n: tuple(f.shape[1:]) for n, f in feats.items()}


def match_stages(cfg: KDConfig, ctx: LossContext) -> list[tuple[str, str]]:
    """(student stage, teacher stage) pairs: the configured ones, or matched by spatial size."""
    if ctx.student is None or ctx.teacher is None or ctx.sample is None:
        raise ValueError(f"loss {cfg.loss!r} compares features: it needs the student, the teacher and a sample batch")
    s_names, t_names = feature_names(ctx.student), feature_names(ctx.teacher)
    if cfg.student_layers or cfg.teacher_layers:
        s_given, t_given = cfg.student_layers or [], cfg.teacher_layers or []
        if len(s_given) != len(t_given):
            raise ValueError(f"kd.student_layers has {len(s_given)} names and kd.teacher_layers {len(t_given)}; "
                             "give one teacher stage per student stage")
        for key, given, known in (("student_layers", s_given, s_names), ("teacher_layers", t_given, t_names)):
            unknown = [g for g in given if g not in known]
            if unknown:
                raise ValueError(f"kd.{key}: no stage named {unknown}; the model has {known}")
        return list(zip(s_given, t_given))
    s_shapes, t_shapes = stage_shapes(ctx.student, s_names, ctx.sample), stage_shapes(ctx.teacher, t_names, ctx.sample)
    pairs = []
    for s in s_names:
        same = [t for t in t_names if len(t_shapes[t]) == 3 and t_shapes[t][1:] == s_shapes[s][1:]]
        if len(s_shapes[s]) == 3 and same:
            pairs.append((s, same[-1]))
    if not pairs:
        raise ValueError(f"loss {cfg.loss!r}: no student stage {s_shapes} has the spatial size of a teacher stage "
                         f"{t_shapes}; name the pairs in kd.student_layers and kd.teacher_layers")
    return pairs


class FeatureLoss(DistillLoss):
    """KD's objective, (1 - lam) * CE + lam * T^2 * KL, plus a weighted feature term. With
    lam = 0 it is the method alone, as in its paper."""

    standardizes = True  # its base is KD's objective

    def __init__(self, cfg: KDConfig, ctx: LossContext, pairs: list[tuple[str, str]]):
        super().__init__()
        self.kd = HintonKD(cfg)
        self.serves_topk = self.kd.serves_topk
        self.reads_logits = max(cfg.lam, cfg.lam_start or 0.0) > 0  # lam = 0 throughout: the method alone
        self.pairs = pairs
        self.student_features = tuple(dict.fromkeys(s for s, _ in pairs))
        self.teacher_features = tuple(dict.fromkeys(t for _, t in pairs))
        with torch.no_grad():
            self.student_shapes = stage_shapes(ctx.student, list(self.student_features), ctx.sample)
            self.teacher_shapes = stage_shapes(ctx.teacher, list(self.teacher_features), ctx.sample)

    def wrap(self, model: nn.Module) -> nn.Module:
        return with_features(model, list(self.student_features))

    def soft_temperature(self) -> float | None:
        return self.kd.soft_temperature() if self.reads_logits else None

    def base(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        if lam == 0:  # the method alone: no teacher logits needed beyond the features
            ce = batch.ce()
            return {"total": ce, "ce": ce}
        return self.kd(batch, lam)


@register("fitnets")
class FitNets(FeatureLoss):
    """Romero et al. 2015. A regressor (1x1 conv + BN, then ReLU with `relu`) maps the student's hint stage onto the
    teacher's; the hint loss is their mean squared error. Joint: base + beta * hint. Stage-wise
    (paper): the first hint_epochs minimise beta * hint alone, which trains only the layers up to
    the hint; the rest minimise the base objective."""

    title = "FitNets (Romero et al. 2015)"
    section = "fitnets"

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        pairs = match_stages(cfg, ctx)
        super().__init__(cfg, ctx, [pairs[len(pairs) // 2]])  # the middle pair: the paper's hint
        self.cfg = cfg.fitnets
        (s, t), = self.pairs
        cs, ct = self.student_shapes[s][0], self.teacher_shapes[t][0]
        layers = [nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct)] + ([nn.ReLU()] if cfg.fitnets.relu else [])
        self.regressor = nn.Sequential(*layers).to(ctx.sample.device)

    def hint(self, batch: Batch) -> torch.Tensor:
        (s, t), = self.pairs
        f_t = batch.teacher_features[t].float()
        f_s = F.adaptive_avg_pool2d(self.regressor(batch.student_features[s].float()), f_t.shape[-2:])
        return F.mse_loss(f_s, f_t)

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        hint = self.hint(batch)
        if self.cfg.stagewise and batch.epoch < self.cfg.hint_epochs:
            return {"total": self.cfg.beta * hint, "hint": hint}
        parts = self.base(batch, lam)
        if self.cfg.stagewise:
            return {**parts, "hint": hint.detach()}
        return {**parts, "total": parts["total"] + self.cfg.beta * hint, "hint": hint}


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """Zagoruyko & Komodakis: mean over channels of |f|^p, flattened and L2-normalised."""
    return F.normalize(f.float().abs().pow(p).mean(1).flatten(1), dim=1)


@register("at")
class AttentionTransfer(FeatureLoss):
    """Zagoruyko & Komodakis 2017: base + beta * sum over stage pairs of mean((Q_s - Q_t)^2),
    Q an attention map. The cache keeps the teacher's maps only (H*W numbers per stage)."""

    title = "AT (Zagoruyko & Komodakis 2017)"
    section = "at"

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        super().__init__(cfg, ctx, match_stages(cfg, ctx))
        self.cfg = cfg.at
        for s, t in self.pairs:
            if self.student_shapes[s][1:] != self.teacher_shapes[t][1:]:
                raise ValueError(f"at: student stage {s} {self.student_shapes[s]} and teacher stage {t} "
                                 f"{self.teacher_shapes[t]} differ in spatial size")

    def reduce_teacher(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: attention_map(f, self.cfg.p) for n, f in features.items()}

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        at = sum((attention_map(batch.student_features[s], self.cfg.p) - batch.teacher_features[t].float()).pow(2).mean()
                 for s, t in self.pairs)
        parts = self.base(batch, lam)
        return {**parts, "total": parts["total"] + self.cfg.beta * at, "at": at}
