import gzip
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from engine import augment
from engine.config import AugmentConfig, DataConfig
from engine.data import load_splits
from engine.feed import DeviceSet
from engine.errors import DataError
from tests.fakes import idx_bytes, write_cifar, write_image_folder


def test_fashion_mnist_splits_are_seeded_and_disjoint(data_cfg):
    a, b = load_splits(data_cfg), load_splits(data_cfg)
    assert (len(a.train), len(a.val), len(a.test)) == (360, 40, 120)
    assert a.input_shape == (1, 28, 28) and a.num_classes == 10
    assert a.train.x.dtype == torch.uint8
    assert torch.equal(a.val.x, b.val.x) and a.fingerprint() == b.fingerprint()
    other = load_splits(data_cfg.model_copy(update={"split_seed": 1}))
    assert other.fingerprint() != a.fingerprint()
    assert a.augment == AugmentConfig(crop_padding=2, flip=True)


def test_normalisation_comes_from_train_split_only(data_cfg):
    s = load_splits(data_cfg)
    mean, std = s.mean_std()
    x = s.train.x.double() / 255
    assert mean[0] == pytest.approx(x.mean().item()) and std[0] == pytest.approx(x.std().item())
    dev = DeviceSet(s.train, mean, std, torch.device("cpu"))
    z = dev.normalize(dev.x)
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1, abs=1e-3)


def test_subset_options(data_cfg):
    s = load_splits(data_cfg.model_copy(update={"train_subset": 100, "test_subset": 50}))
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 50)


def _corrupt(fashion_dir, tmp_path, name, payload: bytes):
    d = tmp_path / "bad"
    shutil.copytree(fashion_dir, d)
    (d / name).write_bytes(payload)
    return DataConfig(source_dir=str(d), root=str(tmp_path / "raw"))


@pytest.mark.parametrize("name,make,message", [
    ("train-images-idx3-ubyte.gz", lambda raw: raw[: len(raw) // 2], "truncated or corrupt gzip"),
    ("train-images-idx3-ubyte.gz", lambda raw: gzip.compress(gzip.decompress(raw)[:-100]), "truncated or padded"),
    ("train-images-idx3-ubyte.gz", lambda raw: gzip.compress(b"\0\0\x08\x01" + gzip.decompress(raw)[4:]), "wrong magic number"),
    ("train-labels-idx1-ubyte.gz", lambda raw: gzip.compress(idx_bytes(np.array([0, 1, 2, 99] * 100, dtype=np.uint8))),
     "label 99 at index 3 is out of range 0..9"),
    ("train-labels-idx1-ubyte.gz", lambda raw: gzip.compress(idx_bytes(np.zeros(7, dtype=np.uint8))),
     "7 labels for 400 images"),
])
def test_bad_idx_input_is_named(fashion_dir, tmp_path, name, make, message):
    cfg = _corrupt(fashion_dir, tmp_path, name, make((fashion_dir / name).read_bytes()))
    with pytest.raises(DataError, match=message) as e:
        load_splits(cfg)
    if "label 99" not in message:
        assert name in str(e.value)


def test_missing_file_is_named(fashion_dir, tmp_path):
    d = tmp_path / "missing"
    shutil.copytree(fashion_dir, d)
    os.remove(d / "t10k-images-idx3-ubyte.gz")
    (tmp_path / "raw" / "FashionMNIST" / "raw").mkdir(parents=True)  # present, so no download is tried
    with pytest.raises(DataError, match="raw/FashionMNIST/raw/t10k-images-idx3-ubyte: file not found"):
        load_splits(DataConfig(source_dir=str(d), root=str(tmp_path / "raw")))


def test_bad_input_writes_nothing_and_leaves_no_staging(fashion_dir, tmp_path, monkeypatch):
    from tasks.catalog import Catalog
    from tasks.config import load_config
    from tasks.stages import run_stage

    bad = _corrupt(fashion_dir, tmp_path, "train-images-idx3-ubyte.gz", b"not gzip at all")
    cfg = load_config(None, {"data.source_dir": bad.source_dir, "data.root": bad.root})
    with pytest.raises(DataError):
        run_stage("prepare-data", cfg, Catalog(tmp_path))
    assert not (tmp_path / "data" / "prepared" / "store.json").exists()
    assert not (tmp_path / "data" / "prepared" / "stage.json").exists()
    assert not (tmp_path / "data" / "prepared.partial").exists()  # the failed stage removed its staging folder


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loader_reads_the_on_disk_format(tmp_path, name, classes):
    write_cifar(tmp_path, classes)
    s = load_splits(DataConfig(name=name, root=str(tmp_path)))
    assert s.input_shape == (3, 32, 32) and s.num_classes == classes
    n_train = 100 if classes == 10 else 20
    assert len(s.train) + len(s.val) == n_train and len(s.test) == 20
    assert s.augment == AugmentConfig(crop_padding=4, flip=True)


def test_bad_cifar_pickle_is_refused(tmp_path):
    write_cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="data_batch_3: not a valid CIFAR pickle"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path)))


def test_cifar_pickle_carrying_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    write_cifar(tmp_path, 10)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataError, match="refused to load"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not (tmp_path / "pwned").exists()


def test_image_folder(tmp_path):
    write_image_folder(tmp_path / "imgs")
    s = load_splits(DataConfig(name=f"imagefolder:{tmp_path / 'imgs'}", image_size=16, channels=3))
    assert s.classes == ["class_0", "class_1", "class_2"] and s.input_shape == (3, 16, 16)
    assert len(s.train) + len(s.val) + len(s.test) == 36


def test_image_folder_faults(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "class_1" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"unreadable image.*class_1/broken.png"):
        load_splits(DataConfig(name=f"imagefolder:{root}"))
    (root / "class_1" / "broken.png").unlink()
    (root / "class_9").mkdir()
    with pytest.raises(DataError, match="class_9: class folder has no images"):
        load_splits(DataConfig(name=f"imagefolder:{root}"))
    one = write_image_folder(tmp_path / "one", classes=1)
    with pytest.raises(DataError, match="need at least 2"):
        load_splits(DataConfig(name=f"imagefolder:{one}"))


def test_fixed_views_are_reproducible_and_view0_is_clean():
    spec = AugmentConfig(crop_padding=2, flip=True)
    a, b = augment.fixed_views(50, spec, seed=3, k_views=4), augment.fixed_views(50, spec, seed=3, k_views=4)
    assert torch.equal(a.dx, b.dx) and torch.equal(a.flip, b.flip)
    assert (a.dx[0] == 2).all() and (a.dy[0] == 2).all() and not a.flip[0].any()
    c = augment.fixed_views(50, spec, seed=4, k_views=4)
    assert not torch.equal(a.dx[1:], c.dx[1:])


def test_crop_and_flip_match_a_manual_crop():
    spec = AugmentConfig(crop_padding=2, flip=True)
    x = torch.randint(0, 255, (3, 1, 6, 6), dtype=torch.uint8)
    views = augment.Views(torch.tensor([0, 2, 4]), torch.tensor([4, 2, 1]), torch.tensor([False, False, True]))
    out = augment.apply(x, views, spec)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    assert torch.equal(out[0], padded[0, :, 4:10, 0:6])
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], padded[2, :, 1:7, 4:10].flip(2))


def test_empty_data_set_is_refused(fashion_dir, tmp_path):
    d = tmp_path / "empty"
    shutil.copytree(fashion_dir, d)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((0, 28, 28), dtype=np.uint8))))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(0, dtype=np.uint8))))
    with pytest.raises(DataError, match="fashion-mnist train split: the data set is empty"):
        load_splits(DataConfig(source_dir=str(d), root=str(tmp_path / "raw")))
