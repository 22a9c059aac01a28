"""Issue 16's logit methods (logit standardization, DIST, CTKD, MLKD) against values computed by
hand on small tensors, and the top-k soft-target cache against the full logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import KDConfig
from engine.losses import Batch, LossContext, build_loss, kl_soft
from tests.test_methods import S, T_, Y, _batch, ce, kl, mean, softmax


def zscore(v):
    m = mean(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return [(x - m) / (sd + 1e-7) for x in v]


def pearson(a, b):
    ma, mb = mean(a), mean(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)) + 1e-8)


def test_logit_standardization_kd_and_dkd_by_hand():
    lam, temp = 0.4, 2.0
    parts = build_loss("kd", KDConfig(standardize=True, temperature=temp))(_batch(), lam)
    soft = mean(kl(softmax(zscore(t), temp), softmax(zscore(s), temp)) for s, t in zip(S, T_)) * temp**2
    hard = mean(ce(s, y) for s, y in zip(S, Y))  # CE reads the raw logits
    assert parts["kd"].item() == pytest.approx(soft, rel=1e-5)
    assert parts["total"].item() == pytest.approx((1 - lam) * hard + lam * soft, rel=1e-5)
    cfg = KDConfig(standardize=True, dkd={"temperature": temp, "warmup_epochs": 1.0})
    dkd = build_loss("dkd", cfg)(_batch(epoch=5.0), 0.0)
    plain = build_loss("dkd", KDConfig(dkd={"temperature": temp}))
    zs, zt = torch.tensor([zscore(s) for s in S]), torch.tensor([zscore(t) for t in T_])
    expect = plain(Batch(zs, torch.tensor(Y), zt, epoch=5.0), 0.0)  # DKD on z-scored logits, CE on raw
    assert dkd["nckd"].item() == pytest.approx(expect["nckd"].item(), rel=1e-5)
    assert dkd["tckd"].item() == pytest.approx(expect["tckd"].item(), rel=1e-5)
    assert dkd["ce"].item() == pytest.approx(hard, rel=1e-5)


def test_dist_by_hand():
    beta, gamma, temp = 2.0, 3.0, 4.0
    parts = build_loss("dist", KDConfig(dist={"beta": beta, "gamma": gamma, "temperature": temp}))(_batch(), 0.0)
    ps, pt = [softmax(s, temp) for s in S], [softmax(t, temp) for t in T_]
    inter = (1 - mean(pearson(a, b) for a, b in zip(ps, pt))) * temp**2
    cols = range(len(S[0]))
    intra = (1 - mean(pearson([r[c] for r in ps], [r[c] for r in pt]) for c in cols)) * temp**2
    assert parts["inter"].item() == pytest.approx(inter, rel=1e-5)
    assert parts["intra"].item() == pytest.approx(intra, rel=1e-5)
    assert parts["total"].item() == pytest.approx(mean(ce(s, y) for s, y in zip(S, Y)) + beta * inter + gamma * intra,
                                                  rel=1e-5)


def test_ctkd_temperature_is_learned_against_the_loss_on_a_curriculum():
    cfg = KDConfig(lam=0.5, ctkd={"t_start": 1.0, "t_range": 20.0, "lambda_min": 0.0, "lambda_max": 1.0,
                                  "curriculum_epochs": 2.0})
    loss = build_loss("ctkd", cfg)
    temp0 = 1 + 20 / (1 + math.exp(-1))  # t starts at 1, as in the authors' code
    # The authors' CosineDecay at their epoch 1, 2, ...: a step per epoch, already 1/curriculum along in the first.
    assert loss.reversal(0.0) == loss.reversal(0.9) == pytest.approx(0.5)
    assert loss.reversal(1.0) == pytest.approx(1.0) and loss.reversal(9.0) == pytest.approx(1.0)
    assert build_loss("ctkd", KDConfig(ctkd={"curriculum_epochs": 4.0})).reversal(0.5) == pytest.approx(
        (1 - math.cos(math.pi / 4)) / 2)
    s = torch.tensor(S, requires_grad=True)
    parts = loss(Batch(s, torch.tensor(Y), torch.tensor(T_), epoch=0.5), 0.5)
    soft = mean(kl(softmax(t, temp0), softmax(x, temp0)) for x, t in zip(S, T_)) * temp0**2
    assert parts["temperature"].item() == pytest.approx(temp0, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(soft, rel=1e-4)
    parts["total"].backward()
    # Without the reversal, d total / d t by autograd through the same formula; reversed and halved (lambda 0.5).
    t = torch.ones(1, requires_grad=True)
    temp = 1 + 20 * torch.sigmoid(t)
    direct = 0.5 * kl_soft(torch.tensor(S), torch.tensor(T_), temp) * temp**2
    direct.backward()
    assert loss.t.grad.item() == pytest.approx(-0.5 * t.grad.item(), rel=1e-4)
    assert s.grad.abs().sum() > 0  # the student still descends


def _mlkd_by_hand(sw, tw, ss, ts, y, temps, pct, form, strong_temps):
    conf = [max(softmax(r)) for r in tw]
    per_class = [sum(softmax(r)[c] for r in tw) for c in range(len(tw[0]))]

    def quantile(v, q):  # linear interpolation, as numpy.percentile and torch.quantile
        v = sorted(v)
        pos = q * (len(v) - 1)
        lo = math.floor(pos)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)

    im = [1.0 if c <= quantile(conf, pct) else 0.0 for c in conf]
    cm = [1.0 if c <= quantile(per_class, pct) else 0.0 for c in per_class]
    if form == "authors":  # the authors multiply each batch-level term by the mask, then average: the kept fraction
        im, cm = [mean(im)] * len(im), [mean(cm)] * len(cm)
    b, n = len(sw), len(sw[0])
    inst = bat = cls = 0.0
    for temp in temps:
        inst += mean(m * kl(softmax(t, temp), softmax(s, temp)) * temp**2 for s, t, m in zip(sw, tw, im))
        s_view, t_view = (ss, ts) if form == "masked-images" or temp in strong_temps else (sw, tw)
        inst += mean(kl(softmax(t, temp), softmax(s, temp)) * temp**2 for s, t in zip(s_view, t_view))
        ps, pt = [softmax(s, temp) for s in sw], [softmax(t, temp) for t in tw]
        for i in range(b):
            bat += im[i] * sum((sum(pt[i][k] * pt[j][k] for k in range(n)) - sum(ps[i][k] * ps[j][k] for k in range(n))) ** 2
                               for j in range(b)) / b
        for c in range(n):
            cls += cm[c] * sum((sum(pt[i][c] * pt[i][d] for i in range(b)) - sum(ps[i][c] * ps[i][d] for i in range(b))) ** 2
                               for d in range(n)) / n
    hard = mean(ce(s, t) for s, t in zip(sw, y)) + mean(ce(s, t) for s, t in zip(ss, y))
    return inst, bat, cls, hard


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)[:, :4])


@pytest.mark.parametrize("form", ["authors", "masked-images"])
def test_mlkd_by_hand(form):
    torch.manual_seed(0)
    sw, tw, ss, ts = (torch.randn(4, 3) * 2 for _ in range(4))
    y = [0, 2, 1, 1]
    cfg = KDConfig(mlkd={"form": form, "temperatures": [1.0, 3.0], "strong_temperatures": [3.0], "percentile": 50.0,
                         "weight": 0.7, "ce_weight": 0.3})
    loss = build_loss("mlkd", cfg, LossContext(teacher=Linear(), seed=0))
    batch = Batch(sw, torch.tensor(y), tw, {"strong": ss, "teacher_strong": ts})
    parts = loss(batch, 0.0)
    inst, bat, cls, hard = _mlkd_by_hand(sw.tolist(), tw.tolist(), ss.tolist(), ts.tolist(), y, [1.0, 3.0], 0.5,
                                         form, [3.0])
    assert parts["instance"].item() == pytest.approx(inst, rel=1e-5)
    assert parts["batch"].item() == pytest.approx(bat, rel=1e-4) and bat > 0
    assert parts["class"].item() == pytest.approx(cls, rel=1e-4) and cls > 0
    assert parts["total"].item() == pytest.approx(0.3 * hard + 0.7 * (inst + bat + cls), rel=1e-5)


def test_mlkd_runs_the_teacher_on_strong_views_it_neither_trains_nor_saves():
    torch.manual_seed(0)
    student, teacher = Linear(), Linear()
    loss = build_loss("mlkd", KDConfig(mlkd={"strong_shift": 2, "strong_erase": 0.25}),
                      LossContext(student=student, teacher=teacher, seed=3))
    assert loss.teacher_online and not loss.serves_topk
    wrapped = loss.wrap(student)
    trained = nn.ModuleList([wrapped, loss])
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in trained.parameters()}
    assert not any(k.startswith(("_teacher", "teacher")) for k in trained.state_dict())
    x = torch.randn(6, 1, 8, 8)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    logits, out = wrapped(x)
    assert torch.equal(logits, student(x))
    assert not torch.equal(out["strong"], student(x))  # the strong view is another image
    # The strong view's draws live in the loss's state: restoring it repeats them (a resumed run).
    loss.load_state_dict(state)
    _, again = wrapped(x)
    assert torch.equal(again["teacher_strong"], out["teacher_strong"])
    _, third = wrapped(x)
    assert not torch.equal(third["teacher_strong"], out["teacher_strong"])


def cifar100_like(b: int = 256, c: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits peaked on a label (top-1 probability about 0.6), and a student's."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (b,), generator=g)
    t = torch.randn(b, c, generator=g) * 2.0
    t[torch.arange(b), y] += 7.0
    return t, torch.randn(b, c, generator=g) * 1.5


@pytest.mark.parametrize("temp,min_cos,ratio", [(1.0, 0.99, 0.95), (2.0, 0.97, 0.68), (4.0, 0.87, 0.53)])
def test_topk_cache_keeps_the_dropped_mass_and_its_kd_gradient_follows_the_full_logits(temp, min_cos, ratio):
    """k = 5 of 100 classes. Dropping the rest (-inf) gave 1.2x, 3x and 13x the full loss and gradient
    cosines 0.99, 0.90, 0.74 at T = 1, 2, 4; spreading the leftover mass evenly gives 0.95x, 0.68x, 0.53x
    and 0.998, 0.976, 0.876 (docs/methods.md)."""
    from engine.soft_targets import SoftTargets, _top

    t, s = cifar100_like()
    values, indices, rest = _top(t, 5)
    cache = SoftTargets(values[None].half(), indices[None].to(torch.int16), 100, rest[None])
    served = cache(torch.arange(len(t)), torch.zeros(len(t), dtype=torch.long))
    # T = 1: the dropped classes carry exactly the teacher's leftover probability
    dropped = torch.ones_like(t, dtype=torch.bool).scatter(1, indices, False)
    p_full, p_served = F.softmax(t, 1), F.softmax(served, 1)
    assert torch.allclose((p_served * dropped).sum(1), (p_full * dropped).sum(1), atol=2e-3)
    grads, values_ = [], []
    for teacher in (t, served):
        x = s.clone().requires_grad_()
        loss = kl_soft(x, teacher, temp) * temp**2
        loss.backward()
        grads.append(x.grad.flatten())
        values_.append(loss.item())
    assert F.cosine_similarity(grads[0], grads[1], dim=0) >= min_cos
    assert values_[1] / values_[0] == pytest.approx(ratio, abs=0.01)  # the loss a top-k cache gives, as documented


def test_a_topk_cache_without_its_leftover_mass_is_refused_by_name(tmp_path):
    from engine import soft_targets
    from engine.errors import CacheMismatchError

    t, _ = cifar100_like(8)
    values, indices, _ = soft_targets._top(t, 5)
    with pytest.raises(CacheMismatchError, match="leftover mass .*rebuild it with its cache stage \\(`takd cache-teacher --force`"):
        soft_targets.SoftTargets(values[None].half(), indices[None].to(torch.int16), 100)


def test_a_topk_cache_serves_kd_and_refuses_the_losses_that_read_every_class(project):
    """DKD's NCKD on a top-k cache with k = 1 was 16,075 against 3.07 from the full logits
    (docs/methods.md): DKD, DIST, MLKD and logit standardization now refuse a top-k cache by name."""
    from engine.errors import KDError
    from experiments.plans import zoo
    from tasks.stages import run_stage
    from tasks.train import train_here

    cfg, cat = project
    cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"topk": 2})})
    run_stage("prepare-data", cfg, cat)
    teacher = zoo(cfg, "teacher", "plain-4", 0)
    assert train_here(zoo(cfg, "student", "plain-2", 0, [teacher], epochs=1), cfg, cat)["test_acc"] > 0.2
    # A student that reads the teacher through another cache gets that cache, in a folder of its own.
    one_view = cfg.cache.model_copy(update={"views": 1})
    assert train_here(zoo(cfg, "student", "plain-2", 0, [teacher], epochs=1, use=one_view), cfg, cat)["test_acc"] > 0.2
    assert (cat.root / teacher.out).parent.joinpath("soft_targets-k1-top2", "manifest.json").is_file()
    for loss, extra, how in (("dkd", {}, ""), ("dist", {}, ""), ("kd", {"standardize": True}, " with kd.standardize")):
        kd = cfg.kd.model_copy(update={"loss": loss, **extra})
        with pytest.raises(KDError, match=rf"loss '{loss}'{how} reads every class's teacher logit, which a top-k "
                                          r"soft-target cache \(cache.topk = 2\) does not keep; set cache.topk to null"):
            train_here(zoo(cfg, "student", "plain-2", 0, [teacher], epochs=1, kd=kd), cfg, cat)


def test_mlflow_method_tag_names_logit_standardization():
    """Grouping MLflow runs by `method` keeps KD and KD with logit standardization apart."""
    from experiments.plans import build_plan
    from tasks.config import PipelineConfig

    cfg = PipelineConfig()
    tags = {r.variant: r.spec.method for r in build_plan("methods", cfg).select(seed=0)}
    assert (tags["kd"], tags["kd-ls"], tags["dkd-ls"], tags["dist"]) == ("KD", "KD + LS", "DKD + LS", "DIST")


def test_experiments_methods_keeps_the_named_variants_what_they_learn_from_and_their_contrasts():
    from engine.errors import KDError
    from experiments.plans import build_plan
    from tasks.config import load_config

    cfg = load_config(None, {"experiments.methods": ["nokd", "kd", "takd", "takd-ls"], "student.seeds": [0, 1]})
    plan = build_plan("methods", cfg)
    assert sorted({r.variant for r in plan.rows}) == ["kd", "nokd", "takd", "takd-ls"] and len(plan.rows) == 8
    assert [r.variant for r in plan.references] == ["teacher", "assistant", "assistant-ls"]
    assert plan.contrasts == [("kd", "nokd"), ("takd", "kd"), ("takd-ls", "kd"), ("takd-ls", "takd")]
    with pytest.raises(KDError, match=r"experiments.methods: no variant \['kd-lss'\]; the methods plan has nokd, kd"):
        build_plan("methods", load_config(None, {"experiments.methods": ["kd-lss"]}))


@pytest.mark.parametrize("loss, settings, warned", [
    ("kd", {"temperature": 4.0}, "temperature 4:"),
    ("kd", {"temperature": 2.0}, None),
    ("ctkd", {"temperature": 2.0}, "temperature 15.62"),  # the learned temperature, not kd.temperature
    ("at", {"temperature": 4.0, "lam": 0.1}, "temperature 4:"),  # a feature loss with a KD term
    ("at", {"temperature": 4.0, "lam": 0.0}, None),  # the method alone reads no logits
])
def test_the_topk_warning_reads_the_temperature_the_loss_softens_at(loss, settings, warned, caplog):
    from types import SimpleNamespace

    from engine.distill import _check_topk
    from tests.test_methods import Tiny

    torch.manual_seed(0)
    cfg = KDConfig(loss=loss, **settings)
    ctx = LossContext(student=Tiny(2, 3), teacher=Tiny(4, 5), sample=torch.randn(4, 1, 16, 16), seed=0)
    spec = SimpleNamespace(name="s", loss=loss, kd=cfg, use=SimpleNamespace(topk=5))
    with caplog.at_level("WARNING"):
        _check_topk(spec, build_loss(loss, cfg, ctx))
    said = [r.getMessage() for r in caplog.records if "cache.topk" in r.getMessage()]
    assert ([warned in said[0]] if said else []) == ([True] if warned else [])


def test_standardize_is_refused_by_a_loss_without_a_standardized_form():
    """DIST once ignored kd.standardize silently: a loss that has no such form now says so."""
    for loss in ("dist", "dml", "self"):
        with pytest.raises(ValueError, match=rf"kd.standardize: loss '{loss}' has no logit-standardized form; "
                                             r"set kd.standardize to false, or use one that has \(.*ctkd.*\)"):
            KDConfig(loss=loss, standardize=True)
    assert all(KDConfig(loss=loss, standardize=True).standardize for loss in ("kd", "dkd", "ctkd", "mlkd", "at"))


def test_guides_in_sequence_each_teach_their_share_of_the_epochs():
    """Progressive distillation: with 3 guides over 6 epochs, guide g alone in epochs [2g, 2g + 2)."""
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 5), torch.randn(3, 4, 5) * 2, torch.tensor([0, 1, 2, 3])
    loss = build_loss("kd", KDConfig(temperature=3.0, ensemble={"combine": "sequence"}), LossContext(epochs=6))
    for epoch, g in ((0.0, 0), (1.9, 0), (2.0, 1), (3.5, 1), (4.0, 2), (5.99, 2)):
        assert loss.soft_term(Batch(s, y, t, epoch=epoch)).item() == pytest.approx(
            kl_soft(s, t[g], 3.0).item() * 9, rel=1e-6)
    with pytest.raises(ValueError, match="needs LossContext.epochs"):
        build_loss("kd", KDConfig(ensemble={"combine": "sequence"})).soft_term(Batch(s, y, t))


def test_a_global_standardize_is_kept_where_it_applies_and_off_where_it_would_do_nothing():
    from experiments.plans import build_plan
    from tasks.config import load_config

    plan = build_plan("methods", load_config(None, {"kd.standardize": True}))
    on = {r.variant: r.spec.kd.standardize for r in plan.rows if r.seed == 0 and r.spec.kd}
    assert on["kd"] and on["dkd"] and on["fitnets-joint"]
    assert not (on["dist"] or on["dml"] or on["self"] or on["at"] or on["irg"])  # no such form, or lam 0
    with pytest.raises(ValueError, match="kd.standardize: loss 'at' at kd.lam 0 has no soft term"):
        KDConfig(loss="at", lam=0.0, standardize=True)


def test_mlkd_strong_temperatures_must_be_among_its_temperatures():
    """Else the strong view is silently never distilled."""
    with pytest.raises(ValueError, match=r"kd.mlkd.strong_temperatures \[3.0, 4.0, 5.0\] must be among"):
        KDConfig(loss="mlkd", mlkd={"temperatures": [1.0, 2.0]})
    assert KDConfig(loss="mlkd", mlkd={"temperatures": [1.0, 2.0], "form": "masked-images"}).mlkd.form
