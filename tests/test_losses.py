import math

import pytest
import torch
import torch.nn.functional as F

from engine.config import KDConfig
from engine.losses import Batch, HintonKD, build_loss, lam_at


def test_hinton_kd_matches_the_formula_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    T, lam = 2.0, 0.3
    parts = HintonKD(KDConfig(temperature=T))(Batch(s, y, t), lam)
    ce = sum(-math.log(math.exp(s[i, y[i]]) / sum(math.exp(v) for v in s[i])) for i in range(2)) / 2
    kl = 0.0
    for i in range(2):
        p = [math.exp(v / T) for v in t[i].tolist()]
        q = [math.exp(v / T) for v in s[i].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl /= 2  # batchmean
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(T * T * kl, rel=1e-5)
    assert parts["total"].item() == pytest.approx((1 - lam) * ce + lam * T * T * kl, rel=1e-5)


def test_lambda_zero_is_cross_entropy_and_equal_logits_give_zero_kl():
    s = torch.randn(4, 5)
    y = torch.randint(0, 5, (4,))
    parts = build_loss("kd", KDConfig())(Batch(s, y, s.clone()), 0.0)
    assert parts["total"].item() == pytest.approx(F.cross_entropy(s, y).item())
    assert parts["kd"].item() == pytest.approx(0, abs=1e-6)


def test_lambda_schedules():
    const = KDConfig(lam=0.6)
    assert [lam_at(const, e, 5) for e in range(5)] == [0.6] * 5
    lin = KDConfig(lam=0.9, lam_start=0.1, lam_schedule="linear")
    assert [round(lam_at(lin, e, 5), 6) for e in range(5)] == [0.1, 0.3, 0.5, 0.7, 0.9]
    cos = KDConfig(lam=0.9, lam_start=0.1, lam_schedule="cosine")
    vals = [lam_at(cos, e, 5) for e in range(5)]
    assert vals[0] == pytest.approx(0.1) and vals[-1] == pytest.approx(0.9) and vals[2] == pytest.approx(0.5)
    assert vals[1] < 0.3  # slow start, unlike linear


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'fitnet'"):
        build_loss("fitnet", KDConfig())
