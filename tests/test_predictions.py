"""A teacher known only by its answers: a predictions file checked against the data set, read with the
temperature handled exactly, fingerprinted, and distilled from as a model's own cache would be."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine import predictions
from engine.data import ImageSet
from engine.errors import DataError, KDError
from tasks.config import load_config
from tasks.stages import run_stage
from tests.conftest import tiny_overrides

CLASSES = 4


def _part(n: int = 6, paths: bool = False) -> ImageSet:
    """Images 1, 3, 5, ... of a listing (a split keeps some of the images, in its own order)."""
    ids = torch.arange(1, 2 * n, 2).flip(0)
    return ImageSet(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), ids,
                    [f"train/c/{i}.png" for i in ids.tolist()] if paths else None)


def _logits(rows: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, CLASSES)) * 3


def test_rows_are_found_by_index_and_by_path(tmp_path):
    z = _logits()
    np.save(tmp_path / "by_position.npy", z)
    order = np.random.default_rng(1).permutation(12)
    np.savez(tmp_path / "by_index.npz", logits=z[order], index=order)
    np.savez(tmp_path / "by_path.npz", logits=z[order], path=np.array([f"train/c/{i}.png" for i in order]))
    lines = ["index," + ",".join(f"c{c}" for c in range(CLASSES))] + [f"{i}," + ",".join(map(repr, z[i].tolist())) for i in order]
    (tmp_path / "small.csv").write_text("\n".join(lines) + "\n")
    part = _part(paths=True)
    want = torch.from_numpy(z[part.ids.numpy()]).float()
    for name in ("by_position.npy", "by_index.npz", "by_path.npz", "small.csv"):
        got, info = predictions.read(tmp_path / name, {"train": part}, CLASSES)
        assert torch.allclose(got["train"], want, atol=1e-6), name
        assert info["kind"] == "logits" and len(info["fingerprint"]) == 16


def _bad(tmp_path, name: str, write) -> str:
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as e:
        predictions.read(path, {"train": _part(paths=True)}, CLASSES)
    assert str(path) in str(e.value)
    return str(e.value)


def test_every_bad_file_gets_one_clear_error(tmp_path):
    z = _logits()
    assert "not found" in _bad(tmp_path, "absent.npy", lambda p: None)
    assert "must be .npy, .npz or .csv" in _bad(tmp_path, "p.txt", lambda p: p.write_text("1"))
    missing = _bad(tmp_path, "m.npz", lambda p: np.savez(p, logits=z[:8], index=np.arange(8)))
    assert "no prediction for 2 of the 6 training images" in missing and "9" in missing
    assert "5 values per image, but the data set has 4 classes" in _bad(
        tmp_path, "c.npy", lambda p: np.save(p, _logits()[:, :1].repeat(5, 1)))
    bad = z.copy()
    bad[7, 2] = np.nan
    assert "NaN or infinite" in _bad(tmp_path, "nan.npy", lambda p: np.save(p, bad))
    bad[7, 2] = np.inf
    assert "first for image 7" in _bad(tmp_path, "inf.npz", lambda p: np.savez(p, logits=bad, index=np.arange(12)))
    off = np.full((12, CLASSES), 0.3)
    assert "sums to 1.2" in _bad(tmp_path, "p.npz", lambda p: np.savez(p, probabilities=off))
    assert "more than one row" in _bad(tmp_path, "d.npz", lambda p: np.savez(p, logits=z, index=np.arange(12) % 11))
    assert "allow_pickle=False" in _bad(tmp_path, "o.npz", lambda p: np.savez(p, logits=z.astype(object)))
    assert "'logits' or 'probabilities'" in _bad(tmp_path, "n.npz", lambda p: np.savez(p, values=z))
    assert "2-D" in _bad(tmp_path, "v.npy", lambda p: np.save(p, z[:, 0]))
    assert "not a number" in _bad(tmp_path, "x.csv", lambda p: p.write_text("index,a,b,c,d\n1,x,1,1,1\n"))
    assert "header 'index' or 'path'" in _bad(tmp_path, "h.csv", lambda p: p.write_text("id,a,b\n1,1,1\n"))


def test_paths_need_a_data_set_that_lists_paths(tmp_path):
    np.savez(tmp_path / "p.npz", logits=_logits(), path=np.array([f"{i}.png" for i in range(12)]))
    with pytest.raises(DataError, match="key them by index"):
        predictions.read(tmp_path / "p.npz", {"train": _part()}, CLASSES)


@pytest.mark.parametrize("made_at", [1.0, 2.0])
def test_probabilities_give_every_temperature_exactly(tmp_path, made_at):
    """softmax(T0 * log p / T) is the teacher's softmax(z / T) at any T: nothing but rounding is lost."""
    z = torch.from_numpy(_logits())
    np.save(tmp_path / "p.npy", (z / made_at).softmax(1).numpy())
    got, info = predictions.read(tmp_path / "p.npy", {"train": _part()}, CLASSES, temperature=made_at)
    assert info["kind"] == "probabilities"
    rows = z[_part().ids]
    for t in (1.0, 4.0):
        assert torch.allclose((got["train"].double() / t).softmax(1), (rows / t).softmax(1), atol=1e-6)
    plain, _ = predictions.read(tmp_path / "p.npy", {"train": _part()}, CLASSES, temperature=1.0)
    if made_at != 1.0:  # read at the wrong temperature, the distribution at T = 4 is another one
        assert not torch.allclose((plain["train"].double() / 4).softmax(1), (rows / 4).softmax(1), atol=1e-3)


def _teacher_logits(cfg, cat) -> tuple[np.ndarray, np.ndarray]:
    """The trained teacher's logits for every training image, keyed by its index in the listing."""
    from engine.trainer import predict
    from engine.workspace import Workspace

    ws = Workspace(cat.prepared, "cpu")
    return predict(ws.load_model_dir(cat.model("teacher")), ws.train).numpy(), ws.splits.train.ids.numpy()


def test_a_file_of_a_models_answers_distils_as_its_cache_does(project, tmp_path_factory):
    """K = 1, no augmentation: the student distilled from the file is the student distilled from the model."""
    from tasks.catalog import Catalog

    cfg, cat = project
    cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"views": 1})})
    cfg = load_config(None, {**cfg.model_dump(mode="json"), "data": {**cfg.data.model_dump(mode="json"),
                                                                    "augment": {"crop_padding": 0, "flip": False}}})
    for name in ("prepare-data", "train-teacher", "cache-teacher"):
        run_stage(name, cfg, cat)
    run_stage("distill-student-blkd", cfg, cat, seed=0)
    logits, index = _teacher_logits(cfg, cat)
    file = tmp_path_factory.mktemp("answers") / "teacher.npz"
    np.savez(file, logits=logits, index=index)

    other = Catalog(tmp_path_factory.mktemp("from-file"))
    from_file = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"predictions": str(file)})})
    for name in ("prepare-data", "train-teacher", "cache-teacher"):
        run_stage(name, from_file, other)
    run_stage("distill-student-blkd", from_file, other, seed=0)
    a, b = (torch.from_numpy(np.load(c.soft_targets("teacher") / "values.npy")).float() for c in (cat, other))
    assert torch.allclose(a, b, rtol=2 ** -10, atol=1e-3)  # fp16: one unit in the last place at most
    sa = torch.load(cat.model("student-blkd-s0") / "model.pt", weights_only=True)
    sb = torch.load(other.model("student-blkd-s0") / "model.pt", weights_only=True)
    assert all(torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-3, atol=1e-3) for k in sa)
    meta = json.loads((other.model("teacher") / "model.json").read_text())
    assert meta["arch"] == "predictions" and meta["best_val_acc"] is None  # the file holds no validation image


def test_a_changed_file_is_read_again_and_model_losses_are_refused(project, fashion_dir, tmp_path_factory):
    cfg, cat = project
    run_stage("prepare-data", cfg, cat)
    from engine.workspace import load_splits_file

    n = max(load_splits_file(cat.prepared).train.ids.tolist()) + 1
    file = tmp_path_factory.mktemp("answers") / "answers.npy"
    np.save(file, np.random.default_rng(0).normal(size=(n, 10)))
    base = {**tiny_overrides(fashion_dir, cat.root), "teacher.predictions": str(file), "cache.views": 1}
    cfg = load_config(None, base)
    first = run_stage("train-teacher", cfg, cat)
    np.save(file, np.random.default_rng(1).normal(size=(n, 10)))
    second = run_stage("train-teacher", cfg, cat)
    assert not second["reused"] and second["model_fingerprint"] != first["model_fingerprint"]
    run_stage("cache-teacher", cfg, cat)
    for over, needle in (({"kd.loss": "fitnets"}, "known only by its predictions"),
                         ({"cache.online": True}, "cache.online runs the teacher")):
        with pytest.raises(KDError, match=needle):
            run_stage("distill-student-blkd", load_config(None, {**base, **over}), cat, seed=0)
    with pytest.raises(KDError, match="set cache.views: 1"):
        run_stage("cache-teacher", load_config(None, {**base, "cache.views": 2}), cat)
