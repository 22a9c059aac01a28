"""Adversarial distillation: the discriminator's loss by hand, and the student's side of the game."""
from __future__ import annotations

import math

import pytest
import torch

from engine.config import KDConfig
from engine.losses import Batch, LossContext, build_loss
from engine.losses.adversarial import Discriminator, discriminator_loss
from tests.test_methods import Tiny


def _bce(x, y):
    return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))


def test_the_discriminators_loss_by_hand():
    d = Discriminator(4, 2)  # widths 4, 2, 2, 2
    with torch.no_grad():
        for layer in d.layers:
            layer.weight.copy_(torch.arange(layer.weight.numel()).view_as(layer.weight) * 0.1 - 0.2)
            layer.bias.fill_(0.05)
    student, teacher = torch.tensor([[1.0, -2.0, 0.5, 3.0]]), torch.tensor([[0.0, 1.0, 2.0, -1.0]])

    def scores(z):
        for i, layer in enumerate(d.layers):
            z = [sum(w * v for w, v in zip(row, z)) + b for row, b in zip(layer.weight.tolist(), layer.bias.tolist())]
            z = [max(v, 0.0) for v in z] if i < 2 else z
        return z

    s, t = scores(student[0].tolist()), scores(teacher[0].tolist())
    by_hand = (_bce(s[0], 1) + _bce(s[1], 0) + _bce(t[0], 0) + _bce(t[1], 1)) / 4
    assert discriminator_loss(d, student, teacher).item() == pytest.approx(by_hand, rel=1e-6)


def _grads(game):
    torch.manual_seed(0)
    ctx = LossContext(student=Tiny(2, 3), sample=torch.randn(4, 1, 16, 16))
    loss = build_loss("adversarial", KDConfig(loss="adversarial", adversarial={"game": game, "weight": 2.0}), ctx)
    torch.manual_seed(1)
    s = (torch.randn(8, 3) * 3).requires_grad_()
    parts = loss(Batch(s, torch.zeros(8, dtype=torch.long), torch.randn(8, 3) * 3), 0.0)
    (parts["total"] - parts["ce"]).backward()  # lam 0: the KD term is 0, the rest is the discriminator's
    return s.grad, [p.grad.clone() for p in loss.discriminator.parameters()], parts


def test_the_student_fools_the_discriminator_that_learns_to_tell():
    """fool: the student's gradient is the joint game's reversed; the discriminator's is the same in both."""
    s_fool, d_fool, parts = _grads("fool")
    s_joint, d_joint, _ = _grads("joint")
    assert s_joint.abs().sum() > 0 and torch.allclose(s_fool, -s_joint)
    assert all(torch.equal(a, b) for a, b in zip(d_fool, d_joint)) and any(g.abs().sum() > 0 for g in d_fool)
    assert parts["total"].item() == pytest.approx(parts["ce"].item() + 2.0 * parts["adversarial"].item(), rel=1e-6)
