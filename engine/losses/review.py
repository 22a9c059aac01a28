"""ReviewKD (Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review").

Each student stage is mapped onto its paired teacher stage by an attention-based fusion (ABF)
module that also sees what the deeper stages made of their own features: the modules run
deepest first, so a shallow stage is compared with the teacher after "reviewing" the deeper
ones. The comparison is the hierarchical context loss (HCL): the full maps' MSE plus the MSEs of
their average-pooled versions, each level weighted half the last.

Where this differs from the authors' code (dvlab-research/ReviewKD, mdistiller):
- the stage pairs are `match_stages`'s, not a per-architecture table, and the reference's extra
  1x1 stage (the pooled feature before the classifier) is not added;
- the fused maps chase the teacher's stage outputs as the models tap them (after the ReLU),
  not the pre-activations the reference reads;
- the ABFs have kd.reviewkd.mid_channels channels, not min(512, the deepest student width).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import KDConfig
from engine.losses import Batch, LossContext, register
from engine.losses.feature import FeatureLoss, match_stages


class ABF(nn.Module):
    """Attention-based fusion: one student stage (1x1 conv + BN to `mid` channels), blended with
    the next-deeper ABF's map by two per-pixel sigmoid weights, then a 3x3 conv + BN to the
    teacher stage's channels. The deepest stage has nothing to fuse (`fuse=False`)."""

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att = nn.Conv2d(2 * mid, 2, 1) if fuse else None
        # The reference's initialisation: kaiming_uniform with a=1 (larger than torch's default a=sqrt(5)).
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None,
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the map compared with the teacher, the fused map handed to the next-shallower ABF)."""
        x = self.conv1(x)
        if self.att is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            w = torch.sigmoid(self.att(torch.cat([x, deeper], dim=1)))
            x = x * w[:, :1] + deeper * w[:, 1:]
        # A pair whose stages differ in size (named in kd.student_layers / teacher_layers): as the
        # reference, the fused map moves onto the teacher's grid before the 3x3 conv, and the shallower
        # ABF gets it from there (it resizes it to its own stage anyway).
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv2(x), x


def hcl(fs: torch.Tensor, ft: torch.Tensor, pool_sizes: list[int]) -> torch.Tensor:
    """Hierarchical context loss of one pair: MSE of the full maps (weight 1), then of the maps
    average-pooled to each size in turn (weights 1/2, 1/4, ...), divided by the weights' sum. As
    the reference, a size that would not shrink the map is skipped and uses up no weight: it would
    only repeat the full-map term."""
    loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
    for size in pool_sizes:
        if size >= max(ft.shape[-2:]):
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        total += weight
    return loss / total


@register("reviewkd")
class ReviewKD(FeatureLoss):
    """Chen et al. 2021: base + w(e) * weight * sum over stage pairs of HCL(ABF output, teacher),
    w(e) = min(epoch / warmup_epochs, 1) (the reference's warm-up: the ABFs start untrained, and
    their first outputs would pull the student towards noise). The pairs run shallow to deep, as
    `match_stages` (or kd.student_layers) gives them."""

    title = "ReviewKD (Chen et al. 2021)"
    section = "reviewkd"

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        super().__init__(cfg, ctx, match_stages(cfg, ctx))
        self.cfg = cfg.reviewkd
        flat = [n for n, shape in (*self.student_shapes.items(), *self.teacher_shapes.items()) if len(shape) != 3]
        if flat:
            raise ValueError(f"reviewkd fuses feature maps; stages {flat} have no spatial size")
        last = len(self.pairs) - 1
        self.abfs = nn.ModuleList(
            ABF(self.student_shapes[s][0], self.cfg.mid_channels, self.teacher_shapes[t][0], fuse=i < last)
            for i, (s, t) in enumerate(self.pairs)).to(ctx.sample.device)

    def review(self, batch: Batch) -> list[torch.Tensor]:
        """The ABF outputs, one per pair in `self.pairs`' order, computed deepest first."""
        out: list[torch.Tensor] = [None] * len(self.pairs)
        deeper = None
        for i in reversed(range(len(self.pairs))):
            s, t = self.pairs[i]
            size = tuple(batch.teacher_features[t].shape[-2:])
            out[i], deeper = self.abfs[i](batch.student_features[s].float(), deeper, size)
        return out

    def warmup(self, epoch: float) -> float:
        return min(epoch / self.cfg.warmup_epochs, 1.0)

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        review = sum(hcl(f, batch.teacher_features[t].float(), self.cfg.pool_sizes)
                     for f, (_, t) in zip(self.review(batch), self.pairs))
        parts = self.base(batch, lam)
        scale = self.warmup(batch.epoch) * self.cfg.weight
        return {**parts, "total": parts["total"] + scale * review, "reviewkd": review}
