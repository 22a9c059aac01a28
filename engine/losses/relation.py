"""Relation-based losses: RKD (distances and angles) and similarity-preserving KD.

Both compare how the student and the teacher arrange a batch, not the features themselves,
so the two networks' widths need not match. They read each network's last stage (the
classifier's input) unless kd.student_layers / kd.teacher_layers name another.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import KDConfig
from engine.losses import Batch, LossContext, register
from engine.losses.feature import FeatureLoss, match_stages
from models.features import feature_names


def _last_stages(cfg: KDConfig, ctx: LossContext) -> list[tuple[str, str]]:
    if cfg.student_layers or cfg.teacher_layers:
        return [match_stages(cfg, ctx)[-1]]
    if ctx.student is None or ctx.teacher is None:
        raise ValueError(f"loss {cfg.loss!r} compares features: it needs the student and the teacher")
    return [(feature_names(ctx.student)[-1], feature_names(ctx.teacher)[-1])]


def pooled(f: torch.Tensor) -> torch.Tensor:
    """One vector per image: a map is averaged over its positions, a vector kept as it is."""
    f = f.float()
    return f.flatten(2).mean(2) if f.dim() > 2 else f.flatten(1)


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows, divided by their mean over distinct pairs."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(1e-12).sqrt()
    d = d * (1 - torch.eye(len(e), device=e.device))
    return d / d[d > 0].mean()


def angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between i and k, for every triplet (i, j, k), flattened [B * B * B]
    (0 where i or k is j). Computed from the Gram matrix G = e e^T, since
    <e_i - e_j, e_k - e_j> = G_ik - G_ij - G_jk + G_jj: O(B^2 D + B^3), not O(B^3 D)."""
    g = e @ e.T
    sq = g.diagonal()
    # dot[j, i, k] = <e_i - e_j, e_k - e_j>
    dot = g[None, :, :] - g.T[:, :, None] - g[:, None, :] + sq[:, None, None]
    norm = (sq[None, :] + sq[:, None] - 2 * g).clamp_min(0).sqrt()  # norm[j, i] = |e_i - e_j|
    denom = norm[:, :, None] * norm[:, None, :]
    cos = torch.where(denom > 1e-12, dot / denom.clamp_min(1e-12), torch.zeros_like(dot))
    return cos.flatten()


@register("rkd")
class RKD(FeatureLoss):
    """Park et al. 2019: base + w_d * smoothL1(distances) + w_a * smoothL1(angles), on each network's
    last stage pooled to one vector per image, as both references read it (the classifier's input).
    Both are unchanged by a shift shared by the batch: the vectors are centred first, which keeps the
    Gram-matrix angles accurate in float32."""
    batch_statistics = "distance and angle relations among the batch's images"

    title = "RKD (Park et al. 2019)"
    section = "rkd"

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        super().__init__(cfg, ctx, _last_stages(cfg, ctx))
        self.cfg = cfg.rkd

    def reduce_teacher(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: pooled(f) for n, f in features.items()}  # what the feature cache keeps

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        (s, t), = self.pairs
        e_s, e_t = (e - e.mean(0, keepdim=True) for e in (pooled(batch.student_features[s]),
                                                           pooled(batch.teacher_features[t])))
        dist = F.smooth_l1_loss(pairwise_distances(e_s), pairwise_distances(e_t))
        ang = F.smooth_l1_loss(angles(e_s), angles(e_t))
        parts = self.base(batch, lam)
        total = parts["total"] + self.cfg.distance * dist + self.cfg.angle * ang
        return {**parts, "total": total, "rkd_distance": dist, "rkd_angle": ang}


def similarity(f: torch.Tensor) -> torch.Tensor:
    """The batch's row-normalised Gram matrix of flattened features: [B, B]."""
    f = f.float().flatten(1)
    return F.normalize(f @ f.T, p=2, dim=1)


@register("sp")
class SimilarityPreserving(FeatureLoss):
    """Tung & Mori 2019: base + gamma * ||G_s - G_t||_F^2 / B^2."""
    batch_statistics = "the batch's similarity matrix"

    title = "SP (Tung & Mori 2019)"
    section = "sp"

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        super().__init__(cfg, ctx, _last_stages(cfg, ctx))
        self.cfg = cfg.sp

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        (s, t), = self.pairs
        g_s, g_t = similarity(batch.student_features[s]), similarity(batch.teacher_features[t])
        sp = (g_s - g_t).pow(2).sum() / len(g_s) ** 2
        parts = self.base(batch, lam)
        return {**parts, "total": parts["total"] + self.cfg.gamma * sp, "sp": sp}
