"""Multi-level logit distillation (Jin et al. 2023): the student and the teacher are aligned on
each image's prediction, on the batch's image-by-image similarities and on the class-by-class
correlations, at several temperatures, on a weak and a strong view of every image.

The weak view is the trainer's (its teacher logits may come from the soft-target cache); the
strong view is made here, per step, so the teacher must run on it: MLKD needs the teacher online.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine import augment
from engine.config import AugmentConfig, KDConfig
from engine.losses import Batch, DistillLoss, LossContext, register, standardized


class ResumableGenerator(nn.Module):
    """A torch.Generator whose state is a buffer, so a checkpoint of the loss resumes its draws."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("state", self.generator.get_state())

    def draw(self, fn):
        """fn(generator), with the generator at the buffer's state; the buffer then holds the new one."""
        self.generator.set_state(self.state.cpu())
        out = fn(self.generator)
        self.state.copy_(self.generator.get_state())
        return out


def strong_view(x: torch.Tensor, shift: int, erase: float, generator: torch.Generator) -> torch.Tensor:
    """A harder view of a normalised batch: each image shifted by up to `shift` pixels, then a
    random square of up to `erase` of its area set to 0 (the data set's mean colour)."""
    b, _, h, w = x.shape
    spec = AugmentConfig(crop_padding=shift)
    x = augment.apply(x, augment.random_views(b, spec, generator).to(x.device), spec)
    if erase > 0:
        most = max(1, int(math.sqrt(erase) * min(h, w)))
        side = torch.randint(1, most + 1, (b,), generator=generator).to(x.device)
        top = (torch.rand(b, generator=generator).to(x.device) * (h - side + 1)).long()
        left = (torch.rand(b, generator=generator).to(x.device) * (w - side + 1)).long()
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        inside_r = (rows[None] >= top[:, None]) & (rows[None] < (top + side)[:, None])
        inside_c = (cols[None] >= left[:, None]) & (cols[None] < (left + side)[:, None])
        x = x.masked_fill((inside_r[:, :, None] & inside_c[:, None, :])[:, None], 0.0)
    return x


class WeakAndStrong(nn.Module):
    """The student on the trainer's (weak) view and on a strong view of it, and the teacher on the
    strong view. The teacher is held outside the module tree: it is neither trained nor saved."""

    def __init__(self, model: nn.Module, teacher: nn.Module, loss: "MLKD"):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_teacher", teacher)
        object.__setattr__(self, "_loss", loss)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self._loss.cfg
        strong = self._loss.rng.draw(lambda g: strong_view(x, cfg.strong_shift, cfg.strong_erase, g))
        with torch.no_grad():
            teacher_strong = self._teacher.eval()(strong).float()
        return self.model(x), {"strong": self.model(strong), "teacher_strong": teacher_strong}


def _kl_rows(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """Per-image KL(t_T || s_T) * T^2: [B]."""
    return F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="none").sum(1) * temp**2


def _gram_rows(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """Per-row squared error of the Gram matrices p p^T (batch) or, given p^T, of the class
    correlations: [rows]."""
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum(1)


@register("mlkd")
class MLKD(DistillLoss):
    """ce_weight * (CE(weak) + CE(strong)) + weight * (instance + batch + class), each summed over
    the temperatures T, on the softened probabilities P (student) and Q (teacher):
    instance = KL * T^2, batch = ||P P^T - Q Q^T||^2 / B, class = ||P^T P - Q^T Q||^2 / C.

    The masks keep the images (and classes) whose teacher confidence on the weak view is at most its
    `percentile` (`le`, as the authors compare). `form` says how they apply:

    - `authors` (Jin et al.'s code): each weak-view term is its batch mean times the fraction the
      mask keeps; the strong view adds, unmasked, KL on the strong view at `strong_temperatures` and
      KL on the weak view at the other temperatures (their code's T = 2 and 6); the strong view's
      batch and class terms are computed there but left out of the objective, so here too.
    - `masked-images` (this project's earlier variant): the mask selects images, and the strong-view
      instance term reads the strong view at every temperature.

    `standardize` z-scores the instance terms' logits only, as Sun et al.'s code does for MLKD."""
    batch_statistics = "batch- and class-level alignment and the confidence percentile masks"

    title = "MLKD (Jin et al. 2023)"
    standardizes = True
    section, kd_objective = "mlkd", False
    serves_topk = False
    teacher_online = True

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        super().__init__()
        if ctx.teacher is None:
            raise ValueError("mlkd runs the teacher on strong views: it needs the teacher")
        self.cfg, self.kd = cfg.mlkd, cfg
        object.__setattr__(self, "teacher", ctx.teacher)  # not a submodule: never trained, never saved
        self.rng = ResumableGenerator(ctx.seed + 104_729)  # apart from the trainer's stream

    def wrap(self, model: nn.Module) -> nn.Module:
        return WeakAndStrong(model, self.teacher, self)

    def masks(self, teacher_weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = F.softmax(teacher_weak, 1)
        q = self.cfg.percentile / 100
        conf, per_class = p.max(1).values, p.sum(0)
        return (conf <= torch.quantile(conf, q)).float(), (per_class <= torch.quantile(per_class, q)).float()

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        s_w, t_w = batch.student_logits, batch.teacher_logits.float()
        s_s, t_s = batch.student_features["strong"], batch.student_features["teacher_strong"]
        image_mask, class_mask = self.masks(t_w)
        # What multiplies each weak-view term: a per-image selection, or the authors' kept fraction.
        per_image = self.cfg.form == "masked-images"
        img_w, cls_w = (image_mask, class_mask) if per_image else (image_mask.mean(), class_mask.mean())
        zs_w, zt_w = standardized(self.kd, s_w, t_w)
        zs_s, zt_s = standardized(self.kd, s_s, t_s)
        inst = batch_t = cls = 0
        for temp in self.cfg.temperatures:
            strong = per_image or temp in self.cfg.strong_temperatures
            inst = inst + (_kl_rows(zs_w, zt_w, temp) * img_w).mean()
            inst = inst + (_kl_rows(zs_s, zt_s, temp) if strong else _kl_rows(zs_w, zt_w, temp)).mean()
            p_s, p_t = F.softmax(s_w / temp, 1), F.softmax(t_w / temp, 1)
            batch_t = batch_t + (_gram_rows(p_s, p_t) * img_w).sum() / len(p_s)
            cls = cls + (_gram_rows(p_s.T, p_t.T) * cls_w).sum() / p_s.shape[1]
        ce = self.cfg.ce_weight * (batch.ce(s_w) + batch.ce(s_s))
        total = ce + self.cfg.weight * (inst + batch_t + cls)
        return {"total": total, "ce": ce, "instance": inst, "batch": batch_t, "class": cls}
