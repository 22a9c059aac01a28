import json

import pytest
import torch

from engine import augment, soft_targets
from engine.config import KDConfig, TrainConfig
from engine.device import seed_everything
from engine.errors import CacheMismatchError, KDError
from engine.fingerprint import model_fingerprint
from engine.losses import Batch, build_loss
from engine.trainer import Teacher, fit
from models import build_model
from tests.engine_helpers import device_sets


@pytest.fixture
def setup(data_cfg):
    s, tr, va, _ = device_sets(data_cfg)
    torch.manual_seed(0)
    teacher = build_model("plain-4", 1, 10, 28).eval()
    key = soft_targets.CacheKey(model_fingerprint(teacher), s.fingerprint(), s.augment.model_dump(), 3, 7, None, 10, len(tr))
    return s, tr, va, teacher, key


@pytest.mark.parametrize("resident", [True, False])
def test_cache_round_trip_and_manifest_written_last(setup, tmp_path, resident):
    s, tr, _, teacher, key = setup
    t = soft_targets.compute(teacher, tr, s.augment, 3, 7, None, batch_size=100)
    assert t.values.dtype == torch.float16 and t.values.shape == (3, len(tr), 10)
    soft_targets.write(tmp_path, teacher, tr, s.augment, key, batch_size=64)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["key"]["views"] == 3 and manifest["key"]["model_fingerprint"] == key.model_fingerprint
    assert manifest["shape"] == [3, len(tr), 10] and set(manifest["files"]) == {"values"}
    loaded = soft_targets.load(tmp_path, key, resident=resident)
    assert loaded.values.resident == resident and loaded.values.shape == (3, len(tr), 10)
    # view k of image i is the teacher on exactly that augmented image, and the one compute() gives in memory
    views = augment.fixed_views(len(tr), s.augment, 7, 3)
    i, k = torch.tensor([5, 17, 18, 300]), torch.tensor([2, 1, 1, 0])
    x = tr.normalize(augment.apply(tr.x[i], views[k, i], s.augment))
    assert torch.equal(loaded(i, k), t(i, k))
    assert torch.allclose(loaded(i, k), teacher(x), atol=2e-2, rtol=1e-2)


def test_mismatched_or_incomplete_cache_is_refused(setup, tmp_path):
    s, tr, _, teacher, key = setup
    with pytest.raises(CacheMismatchError, match="no manifest"):
        soft_targets.load(tmp_path, key)
    soft_targets.write(tmp_path, teacher, tr, s.augment, key)
    other = soft_targets.CacheKey(**{**key.__dict__, "model_fingerprint": "0" * 16, "views": 4})
    with pytest.raises(CacheMismatchError, match=r"model_fingerprint: cache has '[0-9a-f]+', request needs '0+'.*views: cache has 3, request needs 4"):
        soft_targets.load(tmp_path, other)
    values = tmp_path / "values.npy"
    raw = bytearray(values.read_bytes())
    raw[-30] ^= 0xFF
    values.write_bytes(bytes(raw))
    with pytest.raises(CacheMismatchError, match=f"{values}: contents do not match its manifest"):
        soft_targets.load(tmp_path, key)
    values.write_bytes(bytes(raw[:-40]))
    with pytest.raises(CacheMismatchError, match=f"{values}: contents do not match its manifest"):
        soft_targets.load(tmp_path, key)
    values.unlink()
    with pytest.raises(CacheMismatchError, match=f"{values}: missing from the soft-target cache"):
        soft_targets.load(tmp_path, key)


def test_a_cache_read_by_row_needs_no_memory_for_the_whole_array(setup, tmp_path):
    """The values file is read a few rows at a time: truncated after it was opened, a lookup names it rather than
    returning rows of zeros, and the rows it reads before the cut are the right ones."""
    s, tr, _, teacher, key = setup
    soft_targets.write(tmp_path, teacher, tr, s.augment, key)
    loaded = soft_targets.load(tmp_path, key, resident=False)
    whole = soft_targets.compute(teacher, tr, s.augment, 3, 7, None)
    idx, view = torch.tensor([0, 1]), torch.tensor([0, 0])
    assert torch.equal(loaded(idx, view), whole(idx, view))
    values = tmp_path / "values.npy"
    values.write_bytes(values.read_bytes()[:1000])
    with pytest.raises(KDError, match=f"{values}: truncated"):
        loaded(torch.tensor([5]), torch.tensor([2]))


def test_a_guide_whose_logits_overflow_fp16_is_refused_and_no_cache_is_left(setup, tmp_path):
    s, tr, _, teacher, key = setup

    class Diverged(torch.nn.Module):
        def forward(self, x):
            return teacher(x) * 1e9  # a diverged model: finite in fp32, past fp16's 65504

    with pytest.raises(KDError, match="not finite in fp16 in view 0.*has diverged"):
        soft_targets.write(tmp_path / "cache", Diverged(), tr, s.augment, key)
    assert not list((tmp_path / "cache").iterdir())  # the half-written file was removed, no manifest


@pytest.mark.parametrize("resident", [True, False])
def test_topk_cache(setup, tmp_path, resident):
    s, tr, _, teacher, key = setup
    full = soft_targets.compute(teacher, tr, s.augment, 1, 7, None)
    top = soft_targets.compute(teacher, tr, s.augment, 1, 7, 3)
    assert top.values.shape == (1, len(tr), 3) and top.indices.dtype == torch.int16
    idx, view = torch.arange(4), torch.zeros(4, dtype=torch.long)
    dense, sparse = full(idx, view), top(idx, view)
    kept = torch.zeros_like(dense, dtype=torch.bool).scatter(1, dense.topk(3, dim=1).indices, True)
    assert torch.equal(sparse[kept], dense[kept])
    # every dropped class of a row gets one logit: the rest's logsumexp spread over the 7 of them
    rest = dense.float().masked_fill(kept, float("-inf")).logsumexp(1) - torch.log(torch.tensor(7.0))
    assert torch.allclose(sparse.masked_fill(kept, 0).sum(1) / 7, rest, atol=1e-4)
    top_key = soft_targets.CacheKey(**{**key.__dict__, "views": 1, "topk": 3})
    soft_targets.write(tmp_path, teacher, tr, s.augment, top_key)
    loaded = soft_targets.load(tmp_path, top_key, resident=resident)
    assert set(json.loads((tmp_path / "manifest.json").read_text())["files"]) == {"values", "indices", "rest"}
    assert torch.equal(loaded(idx, view), sparse)


def test_cached_and_online_teacher_give_the_same_loss(setup):
    s, tr, _, teacher, key = setup
    cached = soft_targets.compute(teacher, tr, s.augment, 3, 7, None)
    online = soft_targets.OnlineTeacher(teacher)
    views = augment.fixed_views(len(tr), s.augment, 7, 3)
    loss = build_loss("kd", KDConfig(temperature=4))
    student = build_model("plain-2", 1, 10, 28)
    idx, k = torch.arange(0, 64), torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(0))
    x = tr.normalize(augment.apply(tr.x[idx], views[k, idx], s.augment))
    s_logits = student(x)
    a = loss(Batch(s_logits, tr.y[idx], cached(idx, k, x)), 0.5)["total"].item()
    b = loss(Batch(s_logits, tr.y[idx], online(idx, k, x)), 0.5)["total"].item()
    assert a == pytest.approx(b, rel=1e-3)  # the cache stores fp16 logits


def test_distillation_from_cache_and_online_train_alike(setup):
    s, tr, va, teacher, key = setup
    views = augment.fixed_views(len(tr), s.augment, 7, 3)
    results = []
    for source in (soft_targets.compute(teacher, tr, s.augment, 3, 7, None), soft_targets.OnlineTeacher(teacher)):
        gen = seed_everything(0)
        student = build_model("plain-2", 1, 10, 28)
        r = fit(student, tr, va, TrainConfig(epochs=1, batch_size=64), build_loss("kd", KDConfig()), gen, s.augment,
                kd=KDConfig(), teacher=Teacher(source, views))
        results.append(r.history[0])
    assert results[0]["loss_kd"] == pytest.approx(results[1]["loss_kd"], rel=1e-2)


@pytest.mark.parametrize("on_disk", [False, True])
def test_cached_teacher_features_equal_the_online_teachers_up_to_fp16(data_cfg, tmp_path, on_disk):
    """For the same images and views, the feature cache (computed once, fp16; held in memory, or written to disk and
    read by row) returns what running the teacher at that step returns, to fp16's precision."""
    from engine.soft_targets import CachedFeatures, OnlineTeacher, compute_features
    from models import feature_names

    s, train, _, _ = device_sets(data_cfg)
    torch.manual_seed(0)
    teacher = build_model("plain-4", 1, 10, 28).eval()
    names = tuple(feature_names(teacher))
    cache = CachedFeatures(lambda idx, view, x: None,
                           compute_features(teacher, train, s.augment, 2, seed=5, names=names, batch_size=64,
                                            folder=tmp_path / "features" if on_disk else None))
    if on_disk:
        assert sorted(p.name for p in (tmp_path / "features").iterdir()) == sorted(f"{n}.npy" for n in names)
    views = augment.fixed_views(len(train), s.augment, 5, 2)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:50]
    view = torch.randint(0, 2, (50,), generator=torch.Generator().manual_seed(2))
    x = train.normalize(augment.apply(train.x[idx], views[view, idx], s.augment))
    cached, online = cache(idx, view, x).features, OnlineTeacher(teacher, names)(idx, view, x).features
    assert set(cached) == set(online) == set(names)
    for n in names:
        scale = online[n].abs().max().item()
        torch.testing.assert_close(cached[n], online[n], rtol=1e-3, atol=1e-3 * scale)


def test_fresh_views_run_the_teacher_on_a_new_view_at_every_step(setup):
    """K fixed views: the teacher (and the student) only ever see those; fresh views (cache.fresh_views): a new
    random view at each step, the teacher run on exactly the student's input."""
    s, tr, va, teacher, _ = setup
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(idx, view, x):
        seen.append((idx, x))
        return teacher(x)

    clean_share = []
    for views in (augment.fixed_views(len(tr), s.augment, 7, 1), None):  # K = 1: view 0, the clean image
        seen.clear()
        fit(build_model("plain-2", 1, 10, 28), tr, va, TrainConfig(epochs=1, batch_size=64), build_loss("kd", KDConfig()),
            seed_everything(0), s.augment, kd=KDConfig(), teacher=Teacher(recording, views))
        clean = [torch.allclose(x[j], tr.normalize(tr.x[i : i + 1])[0]) for idx, x in seen for j, i in enumerate(idx.tolist())]
        clean_share.append(sum(clean) / len(clean))
    assert clean_share[0] == 1.0 and clean_share[1] < 0.6, clean_share


def test_fresh_views_need_the_teacher_online():
    from engine.spec import GuideUse

    with pytest.raises(ValueError, match="fresh_views: true needs cache.online: true"):
        GuideUse(fresh_views=True)
    assert GuideUse(online=True, fresh_views=True).fresh_views
    # At its default the setting leaves every training's id as it was before it existed; set, it makes another.
    from engine.config import TrainConfig
    from engine.spec import TrainSpec

    teacher = TrainSpec(role="teacher", arch="plain-4", train=TrainConfig())
    blkd = TrainSpec(role="student", arch="plain-2", train=TrainConfig(), loss="kd", kd=KDConfig(), guides=(teacher,),
                     use=GuideUse(online=True))
    assert "fresh_views" not in blkd.identity()["use"]
    assert blkd.model_copy(update={"use": GuideUse(online=True, fresh_views=True)}).id != blkd.id
