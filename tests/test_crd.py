"""CRD against values computed by hand on small tensors (plain Python arithmetic, not the
implementation): the NCE loss and its normalising constant, the memory banks' update, the
negatives' draw, and what trains."""
from __future__ import annotations

import copy
import math
from collections import Counter
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from engine.config import KDConfig
from engine.losses import Batch, LossContext, build_loss
from engine.losses.contrastive import distinct_positions
from tests.test_methods import Tiny, ce, mean

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
Y = [1, 2]
N = 5  # training images
INDEX = [1, 3]
NEGS = [[0, 2, 4], [0, 1, 4]]  # 3 negatives per anchor, none its own row
W_S, B_S = [[1.0, 0.0, -1.0], [0.5, 2.0, 1.0]], [0.1, -0.2]  # student head: 3 channels -> 2
W_T, B_T = [[1.0, 0.0, 0.0, -1.0, 0.5], [0.0, 1.0, 1.0, 0.0, -0.5]], [0.0, 0.3]  # teacher head: 5 -> 2


@pytest.fixture
def ctx():
    torch.manual_seed(0)
    return LossContext(student=Tiny(2, 3), teacher=Tiny(4, 5), sample=torch.randn(4, 1, 16, 16), seed=0,
                       num_train=N)


def crd(ctx, **settings):
    torch.manual_seed(0)  # the heads start from torch's generator, as the trainer seeds it
    return build_loss("crd", KDConfig(loss="crd", crd={"feat_dim": 2, "negatives": 3, **settings}), ctx)


def normalize(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def embed(w, b, f):
    """The head by hand: each image's map averaged over its positions, the linear layer, unit length."""
    return [normalize([dot(row, [mean(x for r in ch for x in r) for ch in img]) + c for row, c in zip(w, b)])
            for img in f.tolist()]


def scores(v, memory, temperature):
    """exp(<v, m> / T) against the positive row, then the negatives, per anchor."""
    return [[math.exp(dot(v[i], memory[r]) / temperature) for r in [INDEX[i], *NEGS[i]]] for i in range(len(v))]


def nce(rows, z):
    """Eq. 18 with P_n = 1/N: -(log D(positive) + sum log(1 - D(negative))) per anchor, averaged."""
    noise = len(rows[0][1:]) / N  # K * P_n
    total = 0.0
    for row in rows:
        p = [s / z for s in row]
        total += math.log(p[0] / (p[0] + noise)) + sum(math.log(noise / (q + noise)) for q in p[1:])
    return -total / len(rows)


def _fixed(loss, memory_s, memory_t):
    with torch.no_grad():
        loss.embed_s.weight.copy_(torch.tensor(W_S)), loss.embed_s.bias.copy_(torch.tensor(B_S))
        loss.embed_t.weight.copy_(torch.tensor(W_T)), loss.embed_t.bias.copy_(torch.tensor(B_T))
        loss.memory_s.copy_(memory_s), loss.memory_t.copy_(memory_t)
    loss.draw_negatives = lambda index: torch.tensor(NEGS)


def _batch(fs, ft, index=INDEX):
    return Batch(torch.tensor(S), torch.tensor(Y), None, {"s1": fs}, {"s1": ft},
                 index=None if index is None else torch.tensor(index))


def test_nce_loss_by_hand_with_a_known_z_and_with_z_from_the_first_batch(ctx):
    temp, beta = 0.5, 2.0
    loss = crd(ctx, nce_t=temp, beta=beta)
    assert loss.pairs == [("s1", "s1")]
    torch.manual_seed(1)
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    mem_s, mem_t = F.normalize(torch.randn(N, 2), dim=1), F.normalize(torch.randn(N, 2), dim=1)
    v_s, v_t = embed(W_S, B_S, fs), embed(W_T, B_T, ft)
    out_s = scores(v_s, mem_t.tolist(), temp)  # the student anchors against the teacher's bank
    out_t = scores(v_t, mem_s.tolist(), temp)  # and the teacher's against the student's
    ce_ = mean(ce(s, y) for s, y in zip(S, Y))

    _fixed(loss, mem_s, mem_t)
    loss.log_z.copy_(torch.tensor([math.log(40.0), math.log(7.0)]))
    parts = loss(_batch(fs, ft), 0.0)
    expected = nce(out_s, 40.0) + nce(out_t, 7.0)
    assert parts["crd"].item() == pytest.approx(expected, rel=1e-5)
    assert parts["total"].item() == pytest.approx(ce_ + beta * expected, rel=1e-5)  # lam 0: CE alone as base

    # Unset, Z is N times the mean score of the first batch (positives and negatives), then kept;
    # the teacher's side may come pooled, as the feature cache keeps it.
    fresh = crd(ctx, nce_t=temp, beta=beta)
    _fixed(fresh, mem_s, mem_t)
    pooled_t = fresh.reduce_teacher({"s1": ft})["s1"]
    assert pooled_t.shape == (2, 5)
    parts = fresh(_batch(fs, pooled_t), 0.0)
    z_s, z_t = (N * mean(x for row in out for x in row) for out in (out_s, out_t))
    assert fresh.log_z.exp().tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    assert parts["crd"].item() == pytest.approx(nce(out_s, z_s) + nce(out_t, z_t), rel=1e-5)
    fresh(_batch(fs, pooled_t), 0.0)
    assert fresh.log_z.exp().tolist() == pytest.approx([z_s, z_t], rel=1e-5)


def test_memory_banks_blend_with_momentum_and_renormalise_the_batch_rows_only(ctx):
    m = 0.3
    loss = crd(ctx, momentum=m)
    torch.manual_seed(2)
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    mem_s, mem_t = F.normalize(torch.randn(N, 2), dim=1), F.normalize(torch.randn(N, 2), dim=1)
    _fixed(loss, mem_s, mem_t)
    loss(_batch(fs, ft), 0.0)
    for bank, old, v in ((loss.memory_s, mem_s.tolist(), embed(W_S, B_S, fs)),
                         (loss.memory_t, mem_t.tolist(), embed(W_T, B_T, ft))):
        expected = [row for row in old]
        for i, r in enumerate(INDEX):
            expected[r] = normalize([m * a + (1 - m) * b for a, b in zip(old[r], v[i])])
        for got, want in zip(bank.tolist(), expected):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_gradients_reach_the_student_and_both_heads_not_the_teacher(ctx):
    loss = crd(ctx)
    logits, feats = loss.wrap(ctx.student)(ctx.sample[:2])
    ft = torch.randn(2, 5, 4, 4, requires_grad=True)
    batch = Batch(logits, torch.tensor(Y), None, feats, {"s1": ft}, index=torch.tensor(INDEX))
    loss(batch, 0.0)["crd"].backward()  # the contrastive term alone: no CE gradient to mask a missing one
    for name, p in [("embed_s", loss.embed_s.weight), ("embed_t", loss.embed_t.weight),
                    ("student s0", ctx.student.s0[0].weight), ("student s1", ctx.student.s1[0].weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert ft.grad is None


def _two_steps(loss):
    torch.manual_seed(3)
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    return [loss(_batch(fs, ft), 0.0)["crd"].item() for _ in range(2)]


def test_the_same_seed_draws_the_same_negatives_and_gives_the_same_loss(ctx):
    index = torch.tensor(INDEX)
    assert torch.equal(crd(ctx).draw_negatives(index), crd(ctx).draw_negatives(index))
    assert _two_steps(crd(ctx)) == _two_steps(crd(ctx))
    ctx.seed = 1
    other = crd(ctx)  # same heads (torch's generator), another run seed: other banks and negatives
    ctx.seed = 0
    assert not torch.equal(other.draw_negatives(index), crd(ctx).draw_negatives(index))
    assert _two_steps(other) != _two_steps(crd(ctx))


def test_negatives_are_every_row_but_the_anchors_own(ctx):
    ctx.num_train = 6
    loss = crd(ctx, negatives=5)
    index = torch.arange(6)
    seen = [set() for _ in index]
    for _ in range(30):
        draw = loss.draw_negatives(index)
        assert draw.shape == (6, 5)
        for i, row in enumerate(draw.tolist()):
            seen[i] |= set(row)
    assert seen == [set(range(6)) - {i} for i in range(6)]


def test_with_labels_negatives_are_every_row_of_the_other_classes(ctx):
    """The reference's default ('exact' sampling): an anchor's negatives are never of its class."""
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    ctx.num_train, ctx.train_labels = 7, labels
    loss = crd(ctx, negatives=6)
    index = torch.arange(7)
    seen = [set() for _ in index]
    for _ in range(60):
        for i, row in enumerate(loss.draw_negatives(index).tolist()):
            seen[i] |= set(row)
    assert seen == [{j for j in range(7) if labels[j] != labels[i]} for i in range(7)]


def test_negatives_are_drawn_without_replacement_each_subset_equally_likely():
    """As the reference's np.random.choice(replace=False): k distinct of n, every k-subset as likely."""
    from scipy.stats import chisquare

    for n in (6, 5):  # redrawn repeats (k at most half of n), and a random permutation's first k
        pos = distinct_positions(torch.full((6000,), n), 3, torch.Generator().manual_seed(0))
        assert all(len(set(row)) == 3 for row in pos.tolist())
        counts = Counter(tuple(sorted(row)) for row in pos.tolist())
        assert set(counts) == set(combinations(range(n), 3))
        assert chisquare(list(counts.values())).pvalue > 1e-3
    mixed = torch.tensor([5, 4, 9, 4] * 50)  # rows of each kind in one call: each stays within its own n
    pos = distinct_positions(mixed, 3, torch.Generator().manual_seed(0))
    assert (pos < mixed[:, None]).all() and all(len(set(row)) == 3 for row in pos.tolist())
    # More negatives than rows: with replacement, as the reference then.
    few = distinct_positions(torch.tensor([2, 9]), 5, torch.Generator().manual_seed(0))
    assert set(few[0].tolist()) <= {0, 1} and len(set(few[1].tolist())) == 5


def test_an_anchors_negatives_are_distinct_rows_of_the_other_classes(ctx):
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1, 2, 0])
    ctx.num_train, ctx.train_labels = 10, labels
    loss = crd(ctx, negatives=6)  # every anchor has at least 6 rows outside its class
    for _ in range(20):
        for i, row in enumerate(loss.draw_negatives(torch.arange(10)).tolist()):
            assert len(set(row)) == 6 and all(labels[j] != labels[i] for j in row)


def test_a_resumed_run_draws_the_same_negatives(ctx):
    torch.manual_seed(4)
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    loss = crd(ctx)
    loss(_batch(fs, ft), 0.0)
    saved = copy.deepcopy(loss.state_dict())
    second = loss(_batch(fs, ft), 0.0)["crd"].item()
    loss.load_state_dict(saved)  # into a loss that has drawn since: its generator rewinds too
    assert loss(_batch(fs, ft), 0.0)["crd"].item() == second
    resumed = crd(ctx)
    resumed.load_state_dict(saved)
    assert resumed(_batch(fs, ft), 0.0)["crd"].item() == second


def test_without_rows_or_a_training_set_size_it_refuses(ctx):
    loss = crd(ctx)
    with pytest.raises(ValueError, match="Batch.index"):
        loss(_batch(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4), index=None), 0.0)
    for n in (0, 1):
        ctx.num_train = n
        with pytest.raises(ValueError, match=f"num_train.*got {n}"):
            crd(ctx)
    ctx.num_train = 3  # fewer images than negatives + 1: the negatives are all the other rows
    assert crd(ctx, negatives=4096).draw_negatives(torch.tensor(INDEX[:1])).shape == (1, 2)


def test_wrapped_model_shares_the_weights_and_keeps_its_plain_forward(ctx):
    loss = crd(ctx)
    model = ctx.student
    wrapped = loss.wrap(model)
    logits, feats = wrapped(ctx.sample)
    assert torch.allclose(logits, model(ctx.sample))
    assert set(feats) == {"s1"}
    ids = {id(p) for p in wrapped.parameters()}
    assert all(id(p) in ids for p in model.parameters())  # training the wrapper trains the model


def test_scoring_with_the_whole_bank_equals_the_references_gather(ctx, monkeypatch):
    """The same losses, gradients and banks over three steps, whether each anchor's rows are gathered (the
    reference's way) or the whole bank multiplied (ours, where the bank is small against the rows per anchor)."""
    from engine.losses import contrastive

    def run(factor):
        monkeypatch.setattr(contrastive, "WHOLE_BANK_FACTOR", factor)
        loss = crd(ctx)
        assert contrastive.whole_bank(loss.memory_s, torch.zeros(2, 4, dtype=torch.long)) == (factor > 0)
        torch.manual_seed(3)
        out = []
        for _ in range(3):
            fs = torch.randn(2, 3, 4, 4, requires_grad=True)
            value = loss(_batch(fs, torch.randn(2, 5, 4, 4)), 0.0)["crd"]
            value.backward()
            out.append((value.detach(), fs.grad, loss.embed_s.weight.grad.clone()))
        return out, (loss.memory_s.clone(), loss.memory_t.clone())

    (whole, banks_whole), (gather, banks_gather) = run(32), run(0)
    for a, b in zip(whole, gather):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(banks_whole, banks_gather):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
