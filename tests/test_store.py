"""The prepared store (engine/store.py) and streamed splits (engine/feed.py): same bytes, same weights, and every
fault in the store named."""
from __future__ import annotations

import errno

import pytest
import torch

from engine.config import DataConfig
from engine.data import Splits, fetch, load_splits
from engine.atomic import load_torch
from engine.errors import DataError
from engine.feed import DeviceSet
from engine.fingerprint import model_fingerprint
from engine.placement import placement
from engine.store import read_manifest, verify, write_store
from engine.workspace import Workspace
from tests.engine_helpers import fit_on

SHARD = 28 * 28 * 50  # 50 images a shard: every split spans several, so batches cross shard boundaries


@pytest.fixture
def stored(data_cfg, tmp_path):
    splits = load_splits(data_cfg)
    write_store(splits, tmp_path / "prepared", shard_bytes=SHARD)
    return splits, tmp_path / "prepared"


def test_the_store_gives_back_every_row_and_the_recorded_statistics(stored):
    splits, folder = stored
    back = Splits.read(folder)
    assert len(read_manifest(folder)["splits"]["train"]["shards"]) == 8  # 360 images, 50 a shard
    for s in ("train", "val", "test"):
        ours, theirs = getattr(back, s), getattr(splits, s)
        assert torch.equal(ours.x[:], theirs.x) and torch.equal(ours.y, theirs.y)
        rows = torch.randperm(len(theirs), generator=torch.Generator().manual_seed(0))[:97]
        assert torch.equal(ours.x[rows], theirs.x[rows])
    assert torch.equal(back.train.ids, splits.train.ids)
    assert back.mean_std() == splits.mean_std() and back.fingerprint() == splits.fingerprint()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_training_streamed_from_disk_ends_with_the_weights_of_one_in_memory(stored, workers):
    splits, folder = stored
    back = Splits.read(folder)
    mean, std = splits.mean_std()
    cpu = torch.device("cpu")
    memory = fit_on(splits, DeviceSet(splits.train, mean, std, cpu), DeviceSet(splits.val, mean, std, cpu))
    train, val = (DeviceSet(getattr(back, s), mean, std, cpu, stream=True, workers=workers) for s in ("train", "val"))
    assert train.streamed and val.streamed
    assert model_fingerprint(fit_on(back, train, val)) == model_fingerprint(memory)


def test_a_streamed_training_killed_mid_epoch_resumes_to_the_uninterrupted_weights(stored, tmp_path):
    splits, folder = stored
    back = Splits.read(folder)
    mean, std = splits.mean_std()
    cpu = torch.device("cpu")
    fit_on(splits, DeviceSet(splits.train, mean, std, cpu), DeviceSet(splits.val, mean, std, cpu), epochs=3,
           workdir=tmp_path / "whole")

    class Killed(Exception):
        pass

    class DiesInEpochTwo(DeviceSet):
        passes = 0

        def batches(self, order):
            DiesInEpochTwo.passes += 1
            for n, batch in enumerate(super().batches(order)):
                if DiesInEpochTwo.passes == 2 and n == 3:
                    raise Killed
                yield batch

    val = DeviceSet(back.val, mean, std, cpu, stream=True)
    with pytest.raises(Killed):
        fit_on(back, DiesInEpochTwo(back.train, mean, std, cpu, stream=True, workers=2), val, epochs=3,
               workdir=tmp_path / "cut")
    assert load_torch(tmp_path / "cut" / "last.pt")["epoch"] == 1
    fit_on(back, DeviceSet(back.train, mean, std, cpu, stream=True, workers=2), val, epochs=3, workdir=tmp_path / "cut")
    # The last epoch's weights: the best-on-validation ones the model is left with may be an earlier epoch's.
    last = [load_torch(tmp_path / run / "last.pt")["model"] for run in ("whole", "cut")]
    assert all(torch.equal(v, last[1][k]) for k, v in last[0].items())


def test_soft_targets_over_a_streamed_split_equal_those_in_memory(stored):
    from engine.soft_targets import compute
    from models import build_model

    splits, folder = stored
    mean, std = splits.mean_std()
    teacher = build_model("plain-2", 1, 10, 28, 0).eval()
    got = [compute(teacher, DeviceSet(part, mean, std, torch.device("cpu"), stream=stream), splits.augment, 2, 3,
                   None, batch_size=64).values
           for part, stream in ((splits.train, False), (Splits.read(folder).train, True))]
    assert got[0].shape == (2, 360, 10) and torch.equal(got[0], got[1])


def _shard(folder, split="train", n=1):
    return folder / split / f"images-{n:05d}.npy"


@pytest.mark.parametrize("fault,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "bytes, the manifest says"),
    (lambda p: p.unlink(), "missing from the prepared store"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x07"), "content differs from the manifest"),
])
def test_a_truncated_missing_or_changed_shard_is_named(stored, fault, message):
    _, folder = stored
    fault(_shard(folder))
    with pytest.raises(DataError, match=f"{_shard(folder)}: .*{message}"):
        Workspace(folder, "cpu", DataConfig(storage="disk"))


def test_a_shard_truncated_after_opening_is_named_not_read_short(stored):
    _, folder = stored
    back = Splits.read(folder)
    path = _shard(folder)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=f"{path}: truncated"):
        back.train.x[torch.arange(60, 70)]


def test_a_missing_store_says_to_prepare_the_data(tmp_path):
    with pytest.raises(DataError, match="store.json: prepared data set not found; run the prepare-data stage"):
        Workspace(tmp_path, "cpu")


def test_auto_storage_keeps_the_small_splits_in_memory_and_streams_what_does_not_fit(stored):
    _, folder = stored
    sizes = {s: sum(x["bytes"] for x in read_manifest(folder)["splits"][s]["shards"]) for s in ("train", "val", "test")}
    assert sizes["val"] < sizes["test"] < sizes["train"] < 1 << 20
    cpu = torch.device("cpu")
    assert set(placement(folder, DataConfig(memory_budget_mb=1), cpu).values()) == {"memory"}
    assert set(placement(folder, DataConfig(memory_budget_mb=0), cpu).values()) == {"disk"}
    assert set(placement(folder, DataConfig(storage="disk", memory_budget_mb=1), cpu).values()) == {"disk"}
    ws = Workspace(folder, "cpu", DataConfig(memory_budget_mb=0))
    assert ws.train.streamed and ws.test.streamed


def test_a_disk_full_during_prepare_data_leaves_no_store(project, monkeypatch):
    import engine.store
    from tasks.stages import run_stage

    cfg, cat = project
    real, calls = engine.store._save_npy, []

    def full_disk(array, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(array, path)

    monkeypatch.setattr(engine.store, "_save_npy", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_stage("prepare-data", cfg, cat)
    assert not cat.prepared.exists() and not cat.prepared.with_name("prepared.partial").exists()
    assert len(calls) == 3


def test_where_the_data_lives_is_not_part_of_any_stage_key(project):
    from tasks.run_context import RunContext
    from tasks.stages import STAGES, instances, work

    cfg, cat = project
    read_time = {"data", *(f"data.{f}" for f in DataConfig.READ_TIME)}
    assert not [(s.name, p) for s in STAGES.values() for p in s.params if p in read_time]
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"storage": "disk", "loader_workers": 0,
                                                                       "memory_budget_mb": 5})})
    ctx = RunContext(root=cat.root, threads=1)
    fetch(cfg.data)
    keys = {work(instances(c, "prepare-data")[0], c, cat, ctx).key for c in (cfg, other)}
    assert len(keys) == 1


def test_teacher_cache_and_student_stages_from_disk_equal_those_in_memory(project, monkeypatch):
    """The teacher trained from streamed splits, its soft targets written from them, and a student distilled with the
    cache read by row from disk: the same weights as all of it in memory."""
    import json

    import engine.soft_targets
    from tasks.stages import run_stage

    cfg, cat = project
    run_stage("prepare-data", cfg, cat)
    made, kept = {}, []
    real = engine.soft_targets.ByView.__init__
    monkeypatch.setattr(engine.soft_targets.ByView, "__init__",
                        lambda self, rows, n, device, resident: kept.append(resident) or real(self, rows, n, device,
                                                                                              resident))
    for storage in ("memory", "disk"):
        other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"storage": storage})})
        for stage, seed in (("train-teacher", None), ("cache-teacher", None), ("distill-student-blkd", 0)):
            run_stage(stage, other, cat, seed=seed, force=True)
        metas = [json.loads((cat.model(m) / "model.json").read_text()) for m in ("teacher", "student-blkd-s0")]
        assert all(set(m["data_placement"].values()) == {storage} for m in metas)
        made[storage] = [m["model_fingerprint"] for m in metas]
        assert set(kept) == {storage == "memory"}
        assert metas[1]["cache_read"] == ("memory" if storage == "memory" else "by row")
        kept.clear()
    assert made["memory"] == made["disk"]


def test_an_image_folder_is_decoded_into_the_store_a_shard_at_a_time(tmp_path, monkeypatch):
    from engine.data import Undecoded
    from tests.fakes import write_image_folder

    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=20)
    cfg = DataConfig(name=f"imagefolder:{root}", image_size=16, channels=3)
    in_memory = load_splits(cfg)
    write_store(in_memory, tmp_path / "whole", shard_bytes=3 * 16 * 16 * 7)
    decoded_rows, decode = [], Undecoded.decode
    monkeypatch.setattr(Undecoded, "decode", lambda self, a=0, b=None: decoded_rows.append(len(self.files[a:b]))
                        or decode(self, a, b))
    lazy = load_splits(cfg, decode=False)
    assert isinstance(lazy.train.x, Undecoded) and not decoded_rows
    manifest = write_store(lazy, tmp_path / "streamed", shard_bytes=3 * 16 * 16 * 7)
    assert max(decoded_rows) == 7 and sum(decoded_rows) == 60  # 7 images a shard, each decoded once
    assert manifest["fingerprint"] == in_memory.fingerprint()
    assert manifest["mean"] == in_memory.mean_std()[0] and manifest["std"] == in_memory.mean_std()[1]
    back = Splits.read(tmp_path / "streamed")
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(back, s).x[:], getattr(in_memory, s).x)


def test_prepare_data_names_every_unreadable_image_and_leaves_no_store(tmp_path, monkeypatch):
    from tasks.catalog import Catalog
    from tasks.config import load_config
    from tasks.stages import run_stage
    from tests.fakes import write_image_folder

    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=20)
    for name in ("class_0/broken.png", "class_2/broken.png"):
        (root / name).write_bytes(b"not an image")
    monkeypatch.setattr("engine.store.SHARD_BYTES", 3 * 32 * 32 * 5)  # the two bad images lie in different shards
    cfg = load_config(None, {"data.name": f"imagefolder:{root}"})
    with pytest.raises(DataError, match=r"2 unreadable image\(s\): .*class_0/broken.png .*; .*class_2/broken.png"):
        run_stage("prepare-data", cfg, Catalog(tmp_path))
    assert not (tmp_path / "data" / "prepared").exists() and not (tmp_path / "data" / "prepared.partial").exists()
