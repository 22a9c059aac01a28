"""Issue 5's losses against values computed by hand on small tensors (plain Python arithmetic,
not the implementation), and the pieces they plug into (feature taps, stage matching)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import KDConfig
from engine.losses import Batch, LossContext, build_loss
from engine.losses.feature import match_stages


def softmax(v, T=1.0):
    e = [math.exp(x / T) for x in v]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ce(logits, y):
    return -math.log(softmax(logits)[y])


def mean(v):
    v = list(v)
    return sum(v) / len(v)


class Tiny(nn.Module):
    """Two stages (s0: 8x8, s1: 4x4) and a linear head; widths picked by the caller."""

    def __init__(self, c0: int, c1: int, classes: int = 3):
        super().__init__()
        self.s0 = nn.Sequential(nn.Conv2d(1, c0, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.s1 = nn.Sequential(nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c1 * 16, classes))
        self.feature_names = ["s0", "s1"]

    def forward(self, x):
        return self.head(self.s1(self.s0(x)))


@pytest.fixture
def ctx():
    torch.manual_seed(0)
    return LossContext(student=Tiny(2, 3), teacher=Tiny(4, 5), sample=torch.randn(4, 1, 16, 16), seed=0)


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[2.0, 1.0, 0.0], [1.0, 3.0, 1.0]]
Y = [1, 2]


def _batch(**kw):
    return Batch(torch.tensor(S), torch.tensor(Y), torch.tensor(T_), **kw)


def test_dkd_by_hand():
    temp, alpha, beta = 2.0, 1.0, 8.0
    cfg = KDConfig(dkd={"alpha": alpha, "beta": beta, "temperature": temp, "warmup_epochs": 2})
    parts = build_loss("dkd", cfg)(_batch(epoch=1.0), 0.1)
    tckd = nckd = 0.0
    for s, t, y in zip(S, T_, Y):
        ps, pt = softmax(s, temp), softmax(t, temp)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        rest = [c for c in range(3) if c != y]
        nckd += kl(softmax([t[c] for c in rest], temp), softmax([s[c] for c in rest], temp))
    tckd, nckd = tckd / 2 * temp**2, nckd / 2 * temp**2
    ce_ = mean(ce(s, y) for s, y in zip(S, Y))
    assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert parts["total"].item() == pytest.approx(ce_ + 0.5 * (alpha * tckd + beta * nckd), rel=1e-5)  # warm 1/2
    assert build_loss("dkd", cfg)(_batch(epoch=0.0), 0.1)["total"].item() == pytest.approx(ce_, rel=1e-5)
    later = build_loss("dkd", cfg)(_batch(epoch=5), 0.1)
    assert later["total"].item() == pytest.approx(ce_ + alpha * tckd + beta * nckd, rel=1e-5)


def test_ensemble_kd_mixes_probabilities_or_weights_the_kls_by_hand():
    s, t1, t2, y = [0.5, -0.5], [2.0, 0.0], [0.0, 1.0], [0]
    batch = Batch(torch.tensor([s]), torch.tensor(y), torch.tensor([[t1], [t2]]), teacher_weights=torch.tensor([3.0, 1.0]))
    temp = 2.0
    q = softmax(s, temp)
    p1, p2 = softmax(t1, temp), softmax(t2, temp)
    mix = [0.75 * a + 0.25 * b for a, b in zip(p1, p2)]
    probs = build_loss("kd", KDConfig(temperature=temp, ensemble={"combine": "probs"}))(batch, 1.0)
    assert probs["kd"].item() == pytest.approx(temp**2 * kl(mix, q), rel=1e-4)  # float32
    kls = build_loss("kd", KDConfig(temperature=temp, ensemble={"combine": "kl"}))(batch, 1.0)
    assert kls["kd"].item() == pytest.approx(temp**2 * (0.75 * kl(p1, q) + 0.25 * kl(p2, q)), rel=1e-5)


def test_stages_pair_by_spatial_size_or_as_named(ctx):
    assert match_stages(KDConfig(loss="at"), ctx) == [("s0", "s0"), ("s1", "s1")]
    named = KDConfig(loss="fitnets", student_layers=["s0"], teacher_layers=["s1"])
    assert match_stages(named, ctx) == [("s0", "s1")]
    with pytest.raises(ValueError, match=r"kd.teacher_layers: no stage named \['layer9'\]"):
        match_stages(KDConfig(student_layers=["s0"], teacher_layers=["layer9"]), ctx)
    with pytest.raises(ValueError, match="one teacher stage per student stage"):
        match_stages(KDConfig(student_layers=["s0", "s1"], teacher_layers=["s1"]), ctx)


def test_fitnets_hint_by_hand_joint_and_stagewise(ctx):
    loss = build_loss("fitnets", KDConfig(loss="fitnets", fitnets={"beta": 10.0, "hint_epochs": 1}), ctx)
    assert loss.pairs == [("s1", "s1")]
    # A regressor we can compute by hand: weights 1..5 from the student's 3 channels summed, BN at identity.
    with torch.no_grad():
        loss.regressor[0].weight.copy_(torch.arange(1.0, 6.0).view(5, 1, 1, 1).expand(5, 3, 1, 1) / 3)
    loss.eval()  # BN on running stats: mean 0, var 1
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    batch = _batch(student_features={"s1": fs}, teacher_features={"s1": ft})
    bn = 1 / math.sqrt(1 + 1e-5)
    sq = [(max((o + 1) * mean(fs[b, :, i, j].tolist()) * bn, 0.0) - ft[b, o, i, j].item()) ** 2  # then the ReLU
          for b in range(2) for o in range(5) for i in range(4) for j in range(4)]
    hint = mean(sq)
    ce_ = mean(ce(s, y) for s, y in zip(S, Y))
    joint = loss(batch, 0.0)
    assert joint["hint"].item() == pytest.approx(hint, rel=1e-4)
    assert joint["total"].item() == pytest.approx(ce_ + 10 * hint, rel=1e-4)
    stagewise = build_loss("fitnets", KDConfig(loss="fitnets", fitnets={"beta": 10.0, "stagewise": True,
                                                                        "hint_epochs": 1}), ctx)
    stagewise.load_state_dict(loss.state_dict())
    stagewise.eval()
    batch.epoch = 0
    assert stagewise(batch, 0.0)["total"].item() == pytest.approx(10 * hint, rel=1e-4)  # hint alone
    batch.epoch = 1
    assert stagewise(batch, 0.0)["total"].item() == pytest.approx(ce_, rel=1e-5)  # then the task loss
    # Stage 1 trains the layers up to the hint (and the regressor), not the ones after it.
    stagewise.train()
    logits, feats = stagewise.wrap(ctx.student)(ctx.sample)
    teacher_feats = {"s1": torch.randn(4, 5, 4, 4)}
    stagewise(Batch(logits, torch.zeros(4, dtype=torch.long), None, feats, teacher_feats, 0.0), 0.0)["total"].backward()
    grads = {n: p.grad for n, p in ctx.student.named_parameters()}
    assert all(grads[n] is None or not grads[n].any() for n in grads if n.startswith("head."))
    assert all(grads[n] is not None and grads[n].any() for n in grads if n.startswith(("s0.", "s1.")))
    assert stagewise.regressor[0].weight.grad.any()


def test_attention_transfer_by_hand(ctx):
    loss = build_loss("at", KDConfig(loss="at", at={"beta": 1000.0}), ctx)
    torch.manual_seed(1)
    raw = {"s0": (torch.randn(2, 2, 8, 8), torch.randn(2, 4, 8, 8)), "s1": (torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))}

    def at_map(f, b):
        a = [mean(f[b, c, i, j].item() ** 2 for c in range(f.shape[1])) for i in range(f.shape[2]) for j in range(f.shape[3])]
        norm = math.sqrt(sum(v * v for v in a))
        return [v / norm for v in a]

    expected = sum(mean((x - z) ** 2 for b in range(2) for x, z in zip(at_map(fs, b), at_map(ft, b)))
                   for fs, ft in raw.values())
    teacher = loss.reduce_teacher({k: ft for k, (_, ft) in raw.items()})  # what the cache keeps
    assert teacher["s0"].shape == (2, 64)
    parts = loss(_batch(student_features={k: fs for k, (fs, _) in raw.items()}, teacher_features=teacher), 0.0)
    assert parts["at"].item() == pytest.approx(expected, rel=1e-4)
    assert parts["total"].item() == pytest.approx(mean(ce(s, y) for s, y in zip(S, Y)) + 1000 * expected, rel=1e-4)


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_distance_and_angle_by_hand(ctx):
    loss = build_loss("rkd", KDConfig(loss="rkd", rkd={"distance": 25.0, "angle": 50.0}), ctx)
    assert loss.pairs == [("s1", "s1")]  # each network's last stage
    es, et = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]]

    def dists(e):
        d = [[math.dist(a, b) for b in e] for a in e]
        mu = mean(v for row in d for v in row if v > 0)
        return [v / mu for row in d for v in row]

    def cosines(e):
        out = []
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    u = [a - b for a, b in zip(e[j], e[i])]
                    v = [a - b for a, b in zip(e[k], e[i])]
                    nu, nv = math.hypot(*u), math.hypot(*v)
                    out.append(0.0 if nu == 0 or nv == 0 else (u[0] * v[0] + u[1] * v[1]) / (nu * nv))
        return out

    dist = mean(smooth_l1(a, b) for a, b in zip(dists(es), dists(et)))
    ang = mean(smooth_l1(a, b) for a, b in zip(cosines(es), cosines(et)))
    # 2x2 maps whose mean over positions is each vector: RKD reads the pooled vector, as both references do.
    wobble = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]) * torch.rand(3, 2, 1, 1)
    batch = Batch(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), torch.zeros(3, 3),
                  student_features={"s1": torch.tensor(es).view(3, 2, 1, 1) + wobble},
                  teacher_features={"s1": torch.tensor(et).view(3, 2, 1, 1) + wobble.flip(0)})
    parts = loss(batch, 0.0)
    assert parts["rkd_distance"].item() == pytest.approx(dist, rel=1e-5)
    assert parts["rkd_angle"].item() == pytest.approx(ang, rel=1e-5)
    assert parts["total"].item() == pytest.approx(math.log(3) + 25 * dist + 50 * ang, rel=1e-5)


def test_similarity_preserving_by_hand(ctx):
    loss = build_loss("sp", KDConfig(loss="sp", sp={"gamma": 3000.0}), ctx)
    fs, ft = [[1.0, 2.0], [0.0, 1.0], [2.0, -1.0]], [[1.0, 0.0, 1.0], [2.0, 1.0, 0.0], [0.0, 1.0, 1.0]]

    def gram(f):
        g = [[sum(a * b for a, b in zip(r, c)) for c in f] for r in f]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]

    gs, gt = gram(fs), gram(ft)
    sp = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    batch = Batch(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), torch.zeros(3, 3),
                  student_features={"s1": torch.tensor(fs).view(3, 2, 1, 1)},
                  teacher_features={"s1": torch.tensor(ft).view(3, 3, 1, 1)})
    parts = loss(batch, 0.0)
    assert parts["sp"].item() == pytest.approx(sp, rel=1e-5)
    assert parts["total"].item() == pytest.approx(math.log(3) + 3000 * sp, rel=1e-5)


def test_deep_mutual_learning_by_hand_and_each_member_gets_its_own_gradient(ctx):
    ctx.build = lambda arch, seed: Tiny(2, 3)
    loss = build_loss("dml", KDConfig(loss="dml", dml={"peers": ["plain-2"], "temperature": 2.0, "weight": 0.5}), ctx)
    a = torch.tensor(S, requires_grad=True)
    b = torch.tensor(T_, requires_grad=True)
    parts = loss(Batch(a, torch.tensor(Y), student_features={"cohort": torch.stack([a, b])}), 0.0)
    ce_a, ce_b = mean(ce(s, y) for s, y in zip(S, Y)), mean(ce(t, y) for t, y in zip(T_, Y))
    kl_ab = mean(kl(softmax(t, 2), softmax(s, 2)) for s, t in zip(S, T_)) * 4  # member a learns from b
    kl_ba = mean(kl(softmax(s, 2), softmax(t, 2)) for s, t in zip(S, T_)) * 4
    assert parts["total"].item() == pytest.approx(ce_a + 0.5 * kl_ab + ce_b + 0.5 * kl_ba, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kl_ab, rel=1e-5)
    parts["total"].backward()
    a2 = torch.tensor(S, requires_grad=True)
    own = F.cross_entropy(a2, torch.tensor(Y)) + 0.5 * 4 * F.kl_div(F.log_softmax(a2 / 2, 1), F.softmax(torch.tensor(T_) / 2, 1),
                                                                    reduction="batchmean")
    own.backward()
    assert torch.allclose(a.grad, a2.grad, atol=1e-6)


def test_self_distillation_by_hand(ctx):
    loss = build_loss("self", KDConfig(loss="self", self_distill={"alpha": 0.3, "temperature": 3.0}), ctx)
    assert loss.stages == ["s0"]
    exit_logits = [[0.0, 1.0, 2.0], [1.0, 1.0, -1.0]]
    parts = loss(Batch(torch.tensor(S), torch.tensor(Y), student_features={"exits": torch.tensor([exit_logits])}), 0.0)
    ce_last = mean(ce(s, y) for s, y in zip(S, Y))
    ce_exit = mean(ce(e, y) for e, y in zip(exit_logits, Y))
    kl_exit = mean(kl(softmax(s, 3), softmax(e, 3)) for s, e in zip(S, exit_logits)) * 9
    # The paper's sum over every classifier: the last one's KL to itself is 0, so its CE weighs 1 - alpha too.
    assert parts["total"].item() == pytest.approx(0.7 * ce_last + 0.7 * ce_exit + 0.3 * kl_exit, rel=1e-5)
    # The last layer teaches the exits, not the reverse: its gradient is its own (1 - alpha) * CE's alone.
    last, exits = torch.tensor(S, requires_grad=True), torch.tensor([exit_logits], requires_grad=True)
    loss(Batch(last, torch.tensor(Y), student_features={"exits": exits}), 0.0)["total"].backward()
    by_hand = [[0.7 * (p - (c == y)) / len(S) for c, p in enumerate(softmax(s))] for s, y in zip(S, Y)]
    assert torch.allclose(last.grad, torch.tensor(by_hand), atol=1e-6)
    assert exits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["fitnets", "at", "rkd", "sp", "self"])
def test_wrapped_model_shares_the_weights_and_keeps_its_plain_forward(name, ctx):
    ctx.build = lambda arch, seed: Tiny(2, 3)
    loss = build_loss(name, KDConfig(loss=name), ctx)
    model = ctx.student
    wrapped = loss.wrap(model)
    logits, feats = wrapped(ctx.sample)
    assert torch.allclose(logits, model(ctx.sample))
    assert set(feats) == set(loss.student_features) or name == "self"
    ids = {id(p) for p in wrapped.parameters()}
    assert all(id(p) in ids for p in model.parameters())  # training the wrapper trains the model


@pytest.fixture
def methods_cfg(project):
    cfg, cat = project
    from tasks.config import load_config

    over = {"student.seeds": [0], "experiments.ensemble_teachers": ["plain-4", "resnet-8"],
            "experiments.dml_peers": ["plain-2"], "kd.fitnets.hint_epochs": 1, "kd.dkd.warmup_epochs": 2,
            # DKD's beta 8 collapses a 2-epoch student to chance on some thread counts (TAKD-DKD did with one).
            "kd.dkd.beta": 2.0,
            # The tiny teacher's logits reach 250 (the real air-32's 7): IRG's MSE on them diverges at lr 0.1.
            "kd.irg.vertex": 0.001,
            "student.train.epochs": 2}
    # The low-lr rows repeat losses at another step size: one of them (DML's) checks the lr scaling.
    from experiments.plans import build_plan

    variants = dict.fromkeys(r.variant for r in build_plan("methods", cfg).rows)
    over["experiments.methods"] = [v for v in variants if not v.endswith("-low-lr") or v == "dml-low-lr"]
    return load_config(None, {**_flat(cfg.model_dump()), **over}), cat


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_every_method_trains_end_to_end_on_tiny_data(methods_cfg):
    """The methods experiment's rows (each loss, DML, born-again, self, ensembles, TAKD with DKD
    at both hops) all train as the experiments run them, each in a process of its own, and learn something."""
    import json

    from experiments.plans import build_plan
    from experiments.run import run_rows
    from tasks.launch import config_file
    from tasks.run_context import RunContext

    cfg, cat = methods_cfg
    plan = build_plan("methods", cfg)
    results = run_rows(plan, cfg, cat, RunContext.resolve(cat.root), config_file(cfg, cat, "test"))
    for row in plan.rows:
        r = results[row.spec.id]
        assert r["test_acc"] > 0.2, (row.variant, r["test_acc"])  # 10 classes: chance is 0.1
    meta = {row.variant: json.loads((cat.root / row.spec.out / "model.json").read_text()) for row in plan.rows}
    assert meta["at"]["loss"] == "at" and meta["at"]["teacher_features"] in ("cached", "online")
    assert meta["fitnets"]["teacher_features_mb"] > 0
    assert meta["ensemble-weighted"]["ensemble_weights"].count(",") == 1
    assert meta["dml"]["loss"] == "dml" and meta["dml"]["arch"] == "plain-2"
    assert meta["self"]["params"] == meta["nokd"]["params"]  # the exits are dropped
    assert meta["mlkd"]["teacher_runs_online"] is True and "teacher_runs_online" not in meta["kd"]
    assert meta["crd"]["teacher_features"] in ("cached", "online") and meta["reviewkd"]["teacher_features_mb"] > 0
    assert {meta[v]["loss"] for v in ("kd-ls", "dist", "ctkd", "mlkd", "crd", "reviewkd")} == {
        "kd", "dist", "ctkd", "mlkd", "crd", "reviewkd"}
    assert meta["crd"]["params"] == meta["nokd"]["params"]  # the heads and memory banks are dropped
    assert meta["xm-kd-edges"]["input"] == "edges" and "input" not in meta["kd"]  # cross-modal: the student's view

    def history(variant: str) -> list[dict]:
        return json.loads((cat.root / plan.select(variant)[0].spec.out / "history.json").read_text())

    # The low-lr rows train on the same schedule, scaled to experiments.low_lr.
    assert history("dml-low-lr")[0]["lr"] / history("dml")[0]["lr"] == pytest.approx(
        cfg.experiments.low_lr / cfg.student.train.lr)
    assert 1 < history("ctkd")[0]["loss_temperature"] < 21  # the learned temperature, within its range
    fitnets = history("fitnets")
    assert "loss_hint" in fitnets[0] and "loss_ce" not in fitnets[0]  # stage 1: the hint alone
    assert "loss_ce" in fitnets[1]


def test_features_cached_or_online_give_the_same_student(methods_cfg):
    """Caching the teacher's features (fp16, in memory) or running the teacher at every step
    trains the same student, up to the cache's rounding; the choice is recorded."""
    import json

    from experiments.plans import zoo
    from tasks.stages import run_stage
    from tasks.train import train_here

    cfg, cat = methods_cfg
    run_stage("prepare-data", cfg, cat)
    accs, modes = [], []
    for mode in ("cached", "online"):
        c = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"features": mode})})
        kd = c.kd.model_copy(update={"loss": "at", "lam": 0.0})
        spec = zoo(c, "student", "plain-2", 3, [zoo(c, "teacher", "plain-4", 0)], epochs=1, kd=kd)
        r = train_here(spec, c, cat, force=True)
        accs.append(r["test_acc"])
        modes.append(json.loads((cat.root / spec.out / "model.json").read_text())["teacher_features"])
    assert modes == ["cached", "online"]
    assert abs(accs[0] - accs[1]) <= 0.05


def test_any_loss_at_each_hop_of_the_pipeline_chain(project):
    """assistant.kd and student.kd pick each hop's loss; unset keys inherit from the top-level kd."""
    from tasks.config import load_config
    from tasks.stages import specs

    cfg, cat = project
    over = {"kd.temperature": 5.0, "assistant.kd.loss": "dkd", "student.kd.loss": "fitnets"}
    cfg2 = load_config(None, {**_flat(cfg.model_dump(exclude={"assistant": {"kd"}, "student": {"kd"}})), **over})
    s = specs(cfg2)
    assert s["assistant"].loss == "dkd" and s["assistant"].kd.temperature == 5.0
    assert s["student-takd-s1"].loss == "fitnets" and s["student-takd-s1"].kd.temperature == 5.0
    assert s["student-nokd-s0"].loss == "ce" and s["student-nokd-s0"].kd is None
    assert s["teacher"].loss == "ce"


def test_a_bad_layer_name_is_one_clear_error(project):
    from engine.errors import KDError
    from experiments.plans import zoo
    from tasks.stages import run_stage
    from tasks.train import train_here

    cfg, cat = project
    run_stage("prepare-data", cfg, cat)
    kd = cfg.kd.model_copy(update={"loss": "fitnets", "student_layers": ["features.9"], "teacher_layers": ["features.0"]})
    spec = zoo(cfg, "student", "plain-2", 0, [zoo(cfg, "teacher", "plain-4", 0)], epochs=1, kd=kd)
    with pytest.raises(KDError, match=r"kd.student_layers: no stage named \['features.9'\]; the model has"):
        train_here(spec, cfg, cat)


def test_weighting_an_ensemble_needs_every_teachers_validation_accuracy(tmp_path):
    """weighted=true reads each teacher's best validation accuracy; an imported teacher that
    was never validated is named, rather than weighted 0 (all zero would be NaN)."""
    import json

    from engine.config import TrainConfig
    from engine.distill import _ensemble_weights
    from engine.errors import KDError
    from engine.spec import TrainSpec

    dirs = []
    for name, acc in (("a", 0.8), ("b", 0.6), ("imported", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text(json.dumps({"best_val_acc": acc}))
        dirs.append(tmp_path / name)
    spec = TrainSpec(role="student", arch="plain-2", train=TrainConfig(), loss="kd", kd=KDConfig(ensemble={"weighted": True}))

    assert _ensemble_weights(spec, dirs[:2]) == [0.8, 0.6]
    assert _ensemble_weights(spec, dirs[:1]) is None  # one teacher: nothing to weigh
    with pytest.raises(KDError, match=r"imported has none; set kd.ensemble.weights"):
        _ensemble_weights(spec, dirs)


def test_each_loss_reports_the_settings_it_reads():
    """MLflow params and the model card name the settings a hop's loss actually uses: DKD its
    own temperature and no lam; the feature losses KD's objective plus their own weights."""
    from engine.losses import loss_settings
    from tasks.model_card import _hop

    kd = KDConfig(loss="dkd", lam=0.3)
    assert set(loss_settings(kd, "dkd")) == {"dkd.alpha", "dkd.beta", "dkd.temperature", "dkd.warmup_epochs",
                                             "standardize"}
    assert loss_settings(KDConfig(standardize=True), "kd")["standardize"] is True
    assert "standardize" not in loss_settings(KDConfig(), "dist") and "dist.beta" in loss_settings(KDConfig(), "dist")
    at = loss_settings(KDConfig(lam=0.0), "at")
    assert at["lam"] == 0.0 and at["at.beta"] == KDConfig().at.beta and "temperature" in at
    assert loss_settings(KDConfig(), "ce") == {}
    assert "dkd.temperature=4.0" in _hop(kd, "takd") and "lam" not in _hop(kd, "takd")
    assert "lam=0.1" in _hop(KDConfig(), "blkd") and _hop(None, "nokd") == "labels only"


def test_the_methods_plan_reads_each_cross_modal_row_against_its_own_view():
    """A student on another view than its teacher's is read against NOKD on that view (what the teacher adds) and
    NOKD on the whole input (what the view costs), never against KD on the whole input."""
    from experiments.plans import build_plan
    from tasks.config import load_config

    plan = build_plan("methods", load_config(None, {"experiments.cross_modal": ["lowres-4", "photo/edges"]}))
    row = plan.select("xm-kd-photo-edges", 0)[0]
    assert row.spec.input == "photo/edges" and row.spec.guides[0].input is None
    assert plan.select("xm-nokd-lowres-4", 0)[0].spec.guides == ()
    xm = [c for c in plan.contrasts if any(v.startswith("xm-") for v in c)]
    assert xm == [("xm-kd-lowres-4", "xm-nokd-lowres-4"), ("xm-nokd-lowres-4", "nokd"),
                  ("xm-kd-photo-edges", "xm-nokd-photo-edges"), ("xm-nokd-photo-edges", "nokd")]
    assert not build_plan("methods", load_config(None, {"experiments.cross_modal": []})).select("xm-*")
