"""Graph-based distillation: the instance relationship graph (IRG, Liu et al., CVPR 2019).

A network's graph over a batch has the images as vertices (their logits) and, per layer, the
squared distances between the images' features as edges; its transformation is how far each
image's features move from one stage to the next. The student matches the teacher's vertices,
edges and transformation, so the two networks' widths need not match. The authors' code is Caffe;
this follows the PyTorch port in Knowledge-Distillation-Zoo (AberHu), which reads the last two
stages, the pooled last stage and the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.config import KDConfig
from engine.losses import Batch, LossContext, register
from engine.losses.feature import FeatureLoss, match_stages
from engine.losses.relation import pooled
from models.features import feature_names


def edges(f: torch.Tensor) -> torch.Tensor:
    """[B, B] squared Euclidean distances between the flattened rows, 0 on the diagonal, over their largest."""
    f = f.float().flatten(1)
    sq = f.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * f @ f.T).clamp_min(1e-12)
    d = d * (1 - torch.eye(len(f), device=f.device))
    return d / d.max().clamp_min(1e-12)  # one image: no edge to scale by


def _same_channels(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The wider map's adjacent channels averaged down to the narrower's count (the port halves: 0::2 + 1::2)."""
    (n, ca, h, w), cb = a.shape, b.shape[1]
    if ca > cb:
        return a.view(n, cb, ca // cb, h, w).mean(2), b
    if cb > ca:
        return a, b.view(n, ca, cb // ca, h, w).mean(2)
    return a, b


def transformation(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """[B] each image's squared distance from stage f1 to the next stage f2 (f1 pooled to f2's size,
    channels averaged to the same count), over the batch's largest."""
    f1, f2 = f1.float(), f2.float()
    if f1.shape[-1] > f2.shape[-1]:
        f1 = F.adaptive_avg_pool2d(f1, f2.shape[-2:])
    f1, f2 = _same_channels(f1, f2)
    d = (f1 - f2).flatten(1).pow(2).sum(1).clamp_min(1e-12)
    return d / d.max()


def _last_two_stages(cfg: KDConfig, ctx: LossContext) -> list[tuple[str, str]]:
    if cfg.student_layers or cfg.teacher_layers:
        pairs = match_stages(cfg, ctx)
    elif ctx.student is None or ctx.teacher is None:
        raise ValueError("loss 'irg' compares features: it needs the student and the teacher")
    else:
        pairs = list(zip(feature_names(ctx.student)[-2:], feature_names(ctx.teacher)[-2:]))
    (s1, t1), (s2, t2) = pairs if len(pairs) == 2 else [(None, None)] * 2
    if len(pairs) != 2 or s1 == s2 or t1 == t2:
        raise ValueError(f"loss 'irg' reads two distinct consecutive stages of each network; got {pairs}: name two "
                         "in kd.student_layers and kd.teacher_layers, earlier first")
    return pairs


@register("irg")
class IRG(FeatureLoss):
    """base + vertex * MSE(z_s, z_t) + edge * mean over (stage 1, stage 2, pooled stage 2) of
    MSE(edges_s, edges_t) + transform * MSE(transformation_s, transformation_t)."""
    batch_statistics = "the graph's edges and transformation, normalised over the batch"

    title = "IRG (Liu et al. 2019)"
    section = "irg"

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        super().__init__(cfg, ctx, _last_two_stages(cfg, ctx))
        self.serves_topk = False  # the vertex term reads every class's logit (FeatureLoss set KD's answer)
        self.cfg = cfg.irg
        for side, shapes in (("student", self.student_shapes), ("teacher", self.teacher_shapes)):
            (c1, *size1), (c2, *size2) = (shapes[n] for n in (self.student_features if side == "student"
                                                              else self.teacher_features))
            if len(size1) != 2 or len(size2) != 2 or size1[0] < size2[0]:
                raise ValueError(f"loss 'irg': the {side}'s stages must be maps, the earlier at least as large as "
                                 f"the later (got {shapes}); name them earlier first in kd.*_layers")
            if max(c1, c2) % min(c1, c2):
                raise ValueError(f"loss 'irg': the {side}'s two stages have {c1} and {c2} channels; the "
                                 "transformation averages the wider's channels down to the narrower's, so one "
                                 "count must divide the other (name other stages in kd.*_layers)")

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        (s1, t1), (s2, t2) = self.pairs
        fs1, fs2 = batch.student_features[s1], batch.student_features[s2]
        ft1, ft2 = batch.teacher_features[t1], batch.teacher_features[t2]
        teacher = batch.teacher_logits if batch.teacher_logits.dim() == 2 else batch.teacher_logits[0]
        vertex = F.mse_loss(batch.student_logits.float(), teacher.float())
        edge = (F.mse_loss(edges(pooled(fs2)), edges(pooled(ft2))) + F.mse_loss(edges(fs1), edges(ft1))
                + F.mse_loss(edges(fs2), edges(ft2))) / 3
        tran = F.mse_loss(transformation(fs1, fs2), transformation(ft1, ft2))
        parts = self.base(batch, lam)
        total = parts["total"] + self.cfg.vertex * vertex + self.cfg.edge * edge + self.cfg.transform * tran
        return {**parts, "total": total, "irg_vertex": vertex, "irg_edge": edge, "irg_transform": tran}
