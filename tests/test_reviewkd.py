"""ReviewKD against values computed by hand on small tensors (plain Python arithmetic, not the
implementation): the hierarchical context loss, the attention-based fusion, the warm-up."""
from __future__ import annotations

import math

import pytest
import torch

from engine.config import KDConfig
from engine.losses import Batch, LossContext, build_loss
from engine.losses.review import ABF, hcl
from models import with_features
from tests.test_methods import Tiny, ce, mean


@pytest.fixture
def ctx():
    torch.manual_seed(0)
    return LossContext(student=Tiny(2, 3), teacher=Tiny(4, 5), sample=torch.randn(4, 1, 16, 16), seed=0)


def pooled(m, k):
    """A square list-of-lists map average-pooled to k x k (k divides its size)."""
    step = len(m) // k
    return [[mean(m[i * step + a][j * step + b] for a in range(step) for b in range(step)) for j in range(k)]
            for i in range(k)]


def mse(a, b):
    return mean((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_hcl_by_hand():
    torch.manual_seed(1)
    for n, levels in ((4, [(2, 1 / 2), (1, 1 / 4)]),  # 4x4: pooling to 4 repeats the full map, skipped
                      (8, [(4, 1 / 2), (2, 1 / 4), (1, 1 / 8)])):
        fs, ft = torch.randn(1, 1, n, n), torch.randn(1, 1, n, n)
        s, t = fs[0, 0].tolist(), ft[0, 0].tolist()
        weighted = mse(s, t) + sum(w * mse(pooled(s, k), pooled(t, k)) for k, w in levels)
        expected = weighted / (1 + sum(w for _, w in levels))
        assert hcl(fs, ft, [4, 2, 1]).item() == pytest.approx(expected, rel=1e-5)


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def test_abf_blends_with_the_upsampled_deeper_map_by_hand():
    abf = ABF(1, 1, 1, fuse=True).eval()  # BN on running stats: x / sqrt(1 + eps)
    with torch.no_grad():
        abf.conv1[0].weight.fill_(2.0)
        # Attention maps we can compute by hand: a0 = sigmoid(own map), a1 = sigmoid(0.5 - deeper map).
        abf.att.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]).view(2, 2, 1, 1))
        abf.att.bias.copy_(torch.tensor([0.0, 0.5]))
    torch.manual_seed(2)
    x, deeper = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 2, 2)
    _, fused = abf(x, deeper, (4, 4))
    bn = 1 / math.sqrt(1 + 1e-5)
    for i in range(4):
        for j in range(4):
            own, d = 2 * x[0, 0, i, j].item() * bn, deeper[0, 0, i // 2, j // 2].item()  # nearest upsampling
            blend = own * sigmoid(own) + d * sigmoid(0.5 - d)
            assert fused[0, 0, i, j].item() == pytest.approx(blend, rel=1e-5, abs=1e-6)


def test_deepest_stage_is_not_fused_and_shallow_stages_review_it(ctx):
    loss = build_loss("reviewkd", KDConfig(loss="reviewkd"), ctx).eval()
    assert loss.pairs == [("s0", "s0"), ("s1", "s1")]
    assert loss.abfs[1].att is None and loss.abfs[0].att is not None
    torch.manual_seed(3)
    fs = {"s0": torch.randn(2, 2, 8, 8), "s1": torch.randn(2, 3, 4, 4)}
    ft = {"s0": torch.randn(2, 4, 8, 8), "s1": torch.randn(2, 5, 4, 4)}
    out = loss.review(Batch(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), None, fs, ft))
    alone, _ = loss.abfs[1](fs["s1"], None, (4, 4))
    assert torch.equal(out[1], alone)  # the deepest stage: its own features only
    changed = loss.review(Batch(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), None,
                                {"s0": fs["s0"], "s1": fs["s1"] + 1}, ft))
    assert not torch.allclose(changed[0], out[0])  # the shallow stage sees the deeper one


@pytest.mark.parametrize("layers, shapes", [
    ({}, [(4, 4, 8, 8), (4, 5, 4, 4)]),
    # the student's 8x8 stage paired with the teacher's 4x4 one: the fused map is resized
    ({"student_layers": ["s0", "s1"], "teacher_layers": ["s1", "s1"]}, [(4, 5, 4, 4), (4, 5, 4, 4)]),
])
def test_outputs_take_the_teacher_stage_shapes_and_gradients_reach_student_and_abfs(ctx, layers, shapes):
    loss = build_loss("reviewkd", KDConfig(loss="reviewkd", **layers), ctx)
    logits, feats = loss.wrap(ctx.student)(ctx.sample)
    with torch.no_grad():
        _, teacher_feats = with_features(ctx.teacher, list(loss.teacher_features))(ctx.sample)
    batch = Batch(logits, torch.zeros(4, dtype=torch.long), None, feats, teacher_feats, 1.0)
    out = loss.review(batch)
    assert [tuple(f.shape) for f in out] == shapes
    loss(batch, 0.0)["reviewkd"].backward()  # the review term alone: CE would reach every stage anyway
    for name, p in [*ctx.student.named_parameters(), *loss.abfs.named_parameters()]:
        if not name.startswith("head."):  # after the last stage: the review cannot reach it
            assert p.grad is not None and p.grad.any(), name


def test_warmup_weight_at_the_start_half_way_and_after(ctx):
    cfg = KDConfig(loss="reviewkd", reviewkd={"weight": 3.0, "warmup_epochs": 2.0})
    loss = build_loss("reviewkd", cfg, ctx).eval()
    torch.manual_seed(4)
    fs = {"s0": torch.randn(2, 2, 8, 8), "s1": torch.randn(2, 3, 4, 4)}
    ft = {"s0": torch.randn(2, 4, 8, 8), "s1": torch.randn(2, 5, 4, 4)}
    logits, y = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [1, 2]
    ce_ = mean(ce(s, c) for s, c in zip(logits, y))

    def parts(epoch):
        return loss(Batch(torch.tensor(logits), torch.tensor(y), None, fs, ft, epoch), 0.0)

    review = parts(0.0)["reviewkd"].item()
    # Every pair counts: the sum of each ABF output's HCL with its teacher stage.
    with torch.no_grad():
        out = loss.review(Batch(torch.tensor(logits), torch.tensor(y), None, fs, ft))
    assert review == pytest.approx(sum(hcl(o, ft[t], [4, 2, 1]).item() for o, (_, t) in zip(out, loss.pairs)), rel=1e-5)
    assert parts(0.0)["total"].item() == pytest.approx(ce_, rel=1e-5)
    assert parts(1.0)["total"].item() == pytest.approx(ce_ + 0.5 * 3 * review, rel=1e-5)
    assert parts(7.5)["total"].item() == pytest.approx(ce_ + 3 * review, rel=1e-5)


def test_wrapped_model_shares_the_weights_and_keeps_its_logits(ctx):
    loss = build_loss("reviewkd", KDConfig(loss="reviewkd"), ctx)
    model = ctx.student
    wrapped = loss.wrap(model)
    logits, feats = wrapped(ctx.sample)
    assert torch.allclose(logits, model(ctx.sample))
    assert set(feats) == {"s0", "s1"}
    ids = {id(p) for p in wrapped.parameters()}
    assert all(id(p) in ids for p in model.parameters())
