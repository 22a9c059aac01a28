"""Batch augmentation on the device: random crop with zero padding, horizontal flip.

A view is (dx, dy, flip) per image. Random views come from the trainer's generator;
cached views come from `fixed_views`, so view k of image i depends only on (seed, i, k).
View 0 is always the clean image, so K=1 means "no augmentation".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config import AugmentConfig


@dataclass
class Views:
    dx: torch.Tensor  # int64 offsets into the padded image, 0..2*pad
    dy: torch.Tensor
    flip: torch.Tensor  # bool

    def to(self, device: torch.device) -> "Views":
        return Views(self.dx.to(device), self.dy.to(device), self.flip.to(device))

    def __getitem__(self, index) -> "Views":
        return Views(self.dx[index], self.dy[index], self.flip[index])


def identity(n: int, spec: AugmentConfig) -> Views:
    p = spec.crop_padding
    return Views(torch.full((n,), p, dtype=torch.long), torch.full((n,), p, dtype=torch.long), torch.zeros(n, dtype=torch.bool))


def random_views(n: int, spec: AugmentConfig, generator: torch.Generator) -> Views:
    p = spec.crop_padding
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5 if spec.flip else torch.zeros(n, dtype=torch.bool)
    return Views(dx, dy, flip)


def fixed_views(n: int, spec: AugmentConfig, seed: int, k_views: int) -> Views:
    """Views [K, N]: row k is view k of every image, a pure function of (seed, k)."""
    rows = [identity(n, spec)]
    for k in range(1, k_views):
        rows.append(random_views(n, spec, torch.Generator().manual_seed(seed * 1_000_003 + k)))
    return Views(*(torch.stack([getattr(r, f) for r in rows]) for f in ("dx", "dy", "flip")))


def apply(x: torch.Tensor, views: Views, spec: AugmentConfig) -> torch.Tensor:
    """x: uint8 [B, C, H, W] on the device; returns the same shape, channels-last in memory."""
    b, _, h, w = x.shape
    if spec.crop_padding:
        p = spec.crop_padding
        xp = F.pad(x, (p, p, p, p))
        rows = views.dy[:, None] + torch.arange(h, device=x.device)
        cols = views.dx[:, None] + torch.arange(w, device=x.device)
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = xp[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [B,H,W,C] -> NCHW view
    if spec.flip:
        x = torch.where(views.flip[:, None, None, None], x.flip(3), x)
    return x
