"""IRG (instance relationship graph) against values computed by hand on small maps."""
from __future__ import annotations

import pytest
import torch

from engine.config import KDConfig
from engine.losses import Batch, LossContext, build_loss
from tests.test_methods import Tiny, ce, mean

B = 3


def _flat(m):
    return m.flatten(1).tolist()


def _edges(rows):
    d = [[sum((a - b) ** 2 for a, b in zip(u, v)) if i != j else 0.0 for j, v in enumerate(rows)]
         for i, u in enumerate(rows)]
    top = max(max(r) for r in d)
    return [[x / top for x in r] for r in d]


def _mse(a, b):
    a, b = [x for r in a for x in (r if isinstance(r, list) else [r])], [x for r in b for x in (r if isinstance(r, list) else [r])]
    return mean((x - y) ** 2 for x, y in zip(a, b))


def _transformation(f1, f2):
    """f1 [B, c1, 8, 8] max-pooled by 2 to f2's 4x4 would not be the port's average: average 2x2 blocks, then
    average adjacent channel groups of the wider map."""
    f1 = torch.nn.functional.avg_pool2d(f1, 2)
    c1, c2 = f1.shape[1], f2.shape[1]
    wide, narrow = (f1, f2) if c1 > c2 else (f2, f1)
    g = wide.shape[1] // narrow.shape[1]
    wide = torch.stack([wide[:, k * g:(k + 1) * g].sum(1) / g for k in range(narrow.shape[1])], 1)
    d = [sum((a - b) ** 2 for a, b in zip(u, v)) for u, v in zip(_flat(wide), _flat(narrow))]
    return [x / max(d) for x in d]


def test_irg_by_hand():
    torch.manual_seed(0)
    ctx = LossContext(student=Tiny(2, 4), teacher=Tiny(6, 3), sample=torch.randn(4, 1, 16, 16), seed=0)
    cfg = KDConfig(loss="irg", lam=0.0, irg={"vertex": 0.3, "edge": 2.0, "transform": 7.0})
    loss = build_loss("irg", cfg, ctx)
    fs = {"s0": torch.rand(B, 2, 8, 8), "s1": torch.rand(B, 4, 4, 4)}
    ft = {"s0": torch.rand(B, 6, 8, 8), "s1": torch.rand(B, 3, 4, 4)}
    zs, zt, y = torch.randn(B, 3), torch.randn(B, 3) * 2, [0, 2, 1]
    parts = loss(Batch(zs, torch.tensor(y), zt, fs, ft), 0.0)
    vertex = _mse(zs.tolist(), zt.tolist())
    pooled = lambda f: f.mean((2, 3)).tolist()
    edge = (_mse(_edges(pooled(fs["s1"])), _edges(pooled(ft["s1"]))) + _mse(_edges(_flat(fs["s0"])), _edges(_flat(ft["s0"])))
            + _mse(_edges(_flat(fs["s1"])), _edges(_flat(ft["s1"])))) / 3
    tran = _mse(_transformation(fs["s0"], fs["s1"]), _transformation(ft["s0"], ft["s1"]))
    assert parts["irg_vertex"].item() == pytest.approx(vertex, rel=1e-5)
    assert parts["irg_edge"].item() == pytest.approx(edge, rel=1e-4) and edge > 0
    assert parts["irg_transform"].item() == pytest.approx(tran, rel=1e-4) and tran > 0
    hard = mean(ce(s, t) for s, t in zip(zs.tolist(), y))
    assert parts["total"].item() == pytest.approx(hard + 0.3 * vertex + 2.0 * edge + 7.0 * tran, rel=1e-5)


def test_irg_refuses_stages_whose_channels_cannot_be_averaged_to_each_other():
    torch.manual_seed(0)
    ctx = LossContext(student=Tiny(2, 3), teacher=Tiny(4, 8), sample=torch.randn(4, 1, 16, 16), seed=0)
    with pytest.raises(ValueError, match="loss 'irg': the student's two stages have 2 and 3 channels"):
        build_loss("irg", KDConfig(loss="irg", lam=0.0), ctx)


def test_irg_refuses_one_stage_twice_or_stages_out_of_order():
    torch.manual_seed(0)
    ctx = LossContext(student=Tiny(2, 4), teacher=Tiny(6, 3), sample=torch.randn(4, 1, 16, 16), seed=0)
    for layers, said in ((["s1", "s1"], "two distinct consecutive stages"), (["s1", "s0"], "earlier first")):
        cfg = KDConfig(loss="irg", lam=0.0, student_layers=layers, teacher_layers=["s0", "s1"])
        with pytest.raises(ValueError, match=f"loss 'irg'.*{said}"):
            build_loss("irg", cfg, ctx)
