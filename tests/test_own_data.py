"""A user's own data and teacher in, a deployable student out (issue 6): CSV data sets and
configured normalisation, teachers as state_dicts, torch.export programs or TorchScript (weights-only or vetted,
checked against the data), fine-tuning an imported teacher, and the exported student."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import DataConfig
from engine.data import load_splits
from engine.errors import CheckpointError, DataError
from models import build_model
from tasks.config import load_config
from tasks.stages import instances, run_instance, run_stage
from tests.conftest import tiny_overrides
from tests.fakes import write_image_folder


def _csv(root: Path, rows: list[tuple[str, str, str]], header="path,label,split") -> Path:
    path = root / "labels.csv"
    path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return path


def test_csv_data_set_with_classes_and_splits(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", classes=3, per_class=6, size=20)
    rows = [(f"imgs/class_{c}/{i}.png", ["cat", "dog", "ant"][c], "test" if i == 0 else "train")
            for c in range(3) for i in range(6)]
    splits = load_splits(DataConfig(name=f"csv:{_csv(tmp_path, rows)}", image_size=16, channels=3, val_fraction=0.2))
    assert splits.classes == ["ant", "cat", "dog"]  # sorted, as ImageFolder would
    assert len(splits.test) == 3 and len(splits.train) + len(splits.val) == 15
    assert splits.input_shape == (3, 16, 16)
    assert folder.exists()


def test_csv_faults_are_named(tmp_path):
    write_image_folder(tmp_path / "imgs", classes=2, per_class=3, size=12)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    rows = [("imgs/class_0/0.png", "a", "train"), ("imgs/missing.png", "a", "train"), ("imgs/broken.png", "b", "train"),
            ("imgs/class_1/0.png", "b", "train")]
    with pytest.raises(DataError, match=r"2 unreadable image\(s\): .*broken.png \(UnidentifiedImageError\); .*missing.png "
                                         r"\(FileNotFoundError\)"):
        load_splits(DataConfig(name=f"csv:{_csv(tmp_path, rows)}", channels=3))
    with pytest.raises(DataError, match=r"needs a header with columns path,label, .*\(found \['file', 'y', 'split'\]\)"):
        load_splits(DataConfig(name=f"csv:{_csv(tmp_path, rows, header='file,y,split')}"))
    with pytest.raises(DataError, match="line 2: split must be train or test"):
        load_splits(DataConfig(name=f"csv:{_csv(tmp_path, [('a.png', 'x', 'dev')])}"))


def test_normalisation_from_config(data_cfg):
    cfg = data_cfg.model_copy(update={"mean": [0.5], "std": [0.25]})
    assert load_splits(cfg).mean_std() == ([0.5], [0.25])
    with pytest.raises(DataError, match="data.mean has 3 values; fashion-mnist has 1 channel"):
        load_splits(data_cfg.model_copy(update={"mean": [0.5] * 3, "std": [0.2] * 3}))
    with pytest.raises(ValueError, match="set both mean and std"):
        DataConfig(mean=[0.5])


@pytest.fixture
def prepared(project):
    cfg, cat = project
    run_stage("prepare-data", cfg, cat)
    return cfg, cat


def _with(cfg, cat, **over):
    base = tiny_overrides(Path(cfg.data.source_dir), cat.root)
    return load_config(None, {**base, **over})


def _exported(model: torch.nn.Module, path: Path, channels: int = 1) -> Path:
    """A teacher as a user brings one of any architecture: torch.export with a dynamic batch, torch.export.save."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(model.eval(), (torch.zeros(2, channels, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def _torchscript(model: torch.nn.Module, path: Path) -> Path:
    with pytest.warns(FutureWarning, match="torch.jit"):  # torch 2.14 deprecates TorchScript, and says so
        torch.jit.save(torch.jit.trace(model.eval(), torch.zeros(2, 1, 28, 28)), str(path))
    return path


def test_exported_teacher_fine_tunes_distils_and_its_class_mapping_is_saved(prepared, tmp_path):
    cfg, cat = prepared
    torch.manual_seed(3)
    path = _exported(build_model("plain-4", 1, 10, 28), tmp_path / "teacher.pt2")
    imported = _with(cfg, cat, **{"teacher.checkpoint": str(path), "teacher.finetune_epochs": 1})
    run_stage("train-teacher", imported, cat)
    meta = json.loads((cat.model("teacher") / "model.json").read_text())
    assert meta["arch"] == "export" and meta["class_to_idx"]["Trouser"] == 1
    before, kept = (torch.export.load(str(p)).state_dict for p in (path, cat.model("teacher") / "model.pt2"))
    assert not torch.equal(before["classifier.1.weight"], kept["classifier.1.weight"])  # fine-tuned, and kept so
    run_stage("cache-teacher", imported, cat)
    result = run_stage("distill-student-blkd", imported, cat, seed=0)
    assert result["best_val_acc"] > 0.2
    student_meta = json.loads((cat.model("student-blkd-s0") / "model.json").read_text())
    assert student_meta["classes"][0] == "T-shirt/top"  # the mapping travels with every model


def test_torchscript_teacher_is_still_read_and_its_deprecation_said_once(prepared, tmp_path, caplog):
    """TorchScript is deprecated upstream: torch's FutureWarning is not hidden, and ours, which says what to do
    instead, is logged once however many times the teacher is loaded."""
    cfg, cat = prepared
    torch.manual_seed(3)
    path = _torchscript(build_model("plain-4", 1, 10, 28), tmp_path / "teacher.ts")
    imported = _with(cfg, cat, **{"teacher.checkpoint": str(path)})
    with pytest.warns(FutureWarning, match="torch.jit"):
        run_stage("train-teacher", imported, cat)
        run_stage("cache-teacher", imported, cat)
    assert json.loads((cat.model("teacher") / "model.json").read_text())["arch"] == "torchscript"
    ours = [r for r in caplog.records if "TorchScript is deprecated upstream" in r.getMessage()]
    assert len(ours) == 1 and "torch.export.save" in ours[0].getMessage()


def test_an_exported_teacher_that_could_run_code_is_refused(prepared, tmp_path):
    """torch.export.load is not weights-only: a `.pt2` whose graph calls anything but an operator, or that holds
    pickles, is refused before torch reads it."""
    import zipfile

    cfg, cat = prepared
    good = _exported(build_model("plain-2", 1, 10, 28), tmp_path / "good.pt2")

    def altered(name: str, change) -> Path:
        out = tmp_path / name
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst:
            for item in src.infolist():
                dst.writestr(item, change(item.filename, src.read(item.filename)))
        return out

    calls_load = altered("calls.pt2", lambda n, b: b.replace(b'"torch.ops.aten.relu_.default"', b'"torch.load"')
                         if n.endswith("models/model.json") else b)
    pickles = altered("pickles.pt2", lambda n, b: b.replace(b'"use_pickle": false', b'"use_pickle": true')
                      if n.endswith("_weights_config.json") else b)
    for path, why in ((calls_load, r"its graph calls \['torch.load'\]"), (pickles, "as pickles")):
        with pytest.raises(CheckpointError, match=why):
            run_stage("train-teacher", _with(cfg, cat, **{"teacher.checkpoint": str(path)}), cat)


def test_state_dict_teacher_fine_tuned_on_the_users_data(prepared, tmp_path):
    cfg, cat = prepared
    torch.manual_seed(4)
    path = tmp_path / "teacher.pt"
    torch.save(build_model("plain-4", 1, 10, 28).state_dict(), path)
    tuned = _with(cfg, cat, **{"teacher.checkpoint": str(path), "teacher.finetune_epochs": 1})
    run_stage("train-teacher", tuned, cat)
    meta = json.loads((cat.model("teacher") / "model.json").read_text())
    assert meta["best_epoch"] == 1 and meta["best_val_acc"] > 0.2
    weights = torch.load(cat.model("teacher") / "model.pt", weights_only=True)
    before = torch.load(path, weights_only=True)
    assert not torch.equal(weights["classifier.1.weight"], before["classifier.1.weight"])


def test_teacher_mismatches_and_pickled_code_are_explained(prepared, tmp_path):
    cfg, cat = prepared
    wrong_classes = _exported(build_model("plain-2", 1, 7, 28), tmp_path / "seven.pt2")
    with pytest.raises(CheckpointError, match=r"outputs \(7,\) per image, but the data set has 10 classes \(T-shirt/top"):
        run_stage("train-teacher", _with(cfg, cat, **{"teacher.checkpoint": str(wrong_classes)}), cat)
    rgb = _exported(build_model("plain-2", 3, 10, 28), tmp_path / "rgb.pt2", channels=3)
    with pytest.raises(CheckpointError, match=r"does not accept the data set's 1x28x28 images"):
        run_stage("train-teacher", _with(cfg, cat, **{"teacher.checkpoint": str(rgb)}), cat)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": build_model("plain-2", 1, 10, 28)}, pickled)  # a whole module: needs pickled code
    with pytest.raises(CheckpointError, match="refused or unreadable as a weights-only checkpoint"):
        run_stage("train-teacher", _with(cfg, cat, **{"teacher.checkpoint": str(pickled), "teacher.arch": "plain-2"}),
                  cat)


def test_exported_student_matches_pytorch_and_has_a_model_card(project):
    cfg, cat = project
    for inst in instances(cfg):
        run_instance(inst, cfg, cat)
    result = json.loads((cat.export / "stage.json").read_text())["result"]
    assert result["pt2_max_abs_diff"] < 1e-4 and result["onnx_max_abs_diff"] < 1e-4
    labels = json.loads((cat.export / "labels.json").read_text())
    assert labels["0"] == "T-shirt/top" and len(labels) == 10
    import onnxruntime as ort

    from engine.workspace import Workspace

    ws = Workspace(cat.prepared, "cpu")
    images = (ws.test.x[:16].float() / 255).numpy()
    session = ort.InferenceSession(str(cat.export / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_pred = session.run(["logits"], {"image": images})[0].argmax(1)
    torch_pred = ws.load_model_dir(cat.model(result["model"])).eval()(ws.test.normalize(ws.test.x[:16])).argmax(1).numpy()
    assert np.array_equal(onnx_pred, torch_pred)
    card = (cat.export / "model_card.md").read_text()
    for phrase in ("% smaller", "of the teacher's accuracy", "teacher plain-4", "Data it was distilled on",
                   "max abs difference", "T-shirt/top", "Selected as the student with the best validation accuracy"):
        assert phrase in card, phrase


def test_worked_example_end_to_end(fashion_dir, tmp_path, monkeypatch):
    """docs/own-data.md at tiny scale: PNG folder, a teacher trained outside the pipeline (torch.export),
    TAKD, export, and the same predictions through ONNX, the torch.export program and the registered MLflow model."""
    import importlib.util

    from tasks.catalog import Catalog
    from tasks.predict import ENGINES, predict

    spec = importlib.util.spec_from_file_location("own_data", Path(__file__).parents[1] / "examples" / "own_data.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    images = tmp_path / "images"
    example.make_folder(images, per_class=30, test_per_class=8, source_dir=str(fashion_dir))
    made = example.train_teacher(images, tmp_path / "teacher.pt2", epochs=1, seed=0)
    assert made["classes"][0] == "Ankle_boot"

    root = tmp_path / "project"
    monkeypatch.setenv("KD_PROJECT_ROOT", str(root))
    monkeypatch.setenv("KD_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    monkeypatch.delenv("KD_MLFLOW_PARENT_RUN", raising=False)
    over = {k: v for k, v in tiny_overrides(fashion_dir, root).items() if not k.startswith(("data.", "teacher.arch"))}
    cfg = load_config(None, {**over, "data.name": f"imagefolder:{images}", "data.channels": 1, "data.image_size": 28,
                             "data.mean": [0.5], "data.std": [0.5], "teacher.checkpoint": str(tmp_path / "teacher.pt2")})
    cat = Catalog(root)
    for inst in instances(cfg):
        run_instance(inst, cfg, cat)
    pngs = sorted(str(p) for p in (images / "test").rglob("*.png"))[:6]
    uri = f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"
    from tasks.run_context import RunContext

    ctx = RunContext.resolve(root)
    answers = {engine: predict(pngs, cat.export, engine, uri, ctx) for engine in ENGINES}
    assert answers["onnx"] == answers["pt2"]
    assert [a["class"] for a in answers["mlflow"]] == [a["class"] for a in answers["onnx"]]
    assert all(a["class"] in made["classes"] for a in answers["onnx"])
    card = (cat.export / "model_card.md").read_text()
    assert "teacher export" in card and "imagefolder" in card

    # 2b and 3 again: the teacher absent, only its probabilities on the training images, keyed by path
    example.teacher_predictions(images, tmp_path / "teacher.pt2", tmp_path / "predictions.npz")
    from engine.workspace import load_splits_file

    val = load_splits_file(cat.prepared).val
    with torch.no_grad():
        own = torch.export.load(str(tmp_path / "teacher.pt2")).module()((val.x[:].float() / 255 - 0.5) / 0.5).argmax(1)
    (tmp_path / "teacher.pt2").unlink()
    other = Catalog(tmp_path / "from-file")
    monkeypatch.setenv("KD_PROJECT_ROOT", str(other.root))
    monkeypatch.setenv("KD_TRACKING", "0")  # MLflow was checked above
    cfg = load_config(None, {**over, "data.name": f"imagefolder:{images}", "data.channels": 1, "data.image_size": 28,
                             "data.mean": [0.5], "data.std": [0.5], "cache.views": 1, "student.seeds": [0],
                             "teacher.predictions": str(tmp_path / "predictions.npz")})
    for inst in instances(cfg):
        run_instance(inst, cfg, other)
    teacher = json.loads((other.model("teacher") / "model.json").read_text())
    assert teacher["arch"] == "predictions" and teacher["predictions"]["kind"] == "probabilities"
    # its answers on the validation images (the file holds them too), found by path: the teacher's own
    assert teacher["best_val_acc"] == pytest.approx((own == val.y).float().mean().item(), abs=1e-6)
    assert "known only by its predictions" in (other.export / "model_card.md").read_text()


def test_torchvision_architecture_with_a_weights_file(prepared, tmp_path):
    """A teacher trained with torchvision's own resnet18 (its first conv made 1-channel) imports as tv:resnet18."""
    import torchvision
    from torch import nn

    cfg, cat = prepared
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    imported = _with(cfg, cat, **{"teacher.checkpoint": str(path), "teacher.arch": "tv:resnet18"})
    run_stage("train-teacher", imported, cat)
    assert json.loads((cat.model("teacher") / "model.json").read_text())["arch"] == "tv:resnet18"
    # Its stages are found by spatial size, so feature and relation losses pair with them.
    assert build_model("tv:resnet18", 1, 10, 28).feature_names == ["relu", "layer1", "layer2", "layer3", "avgpool"]
    run_stage("cache-teacher", imported, cat)
    for loss in ("at", "rkd"):
        over = {"teacher.checkpoint": str(path), "teacher.arch": "tv:resnet18", "kd.loss": loss, "kd.lam": 0.0}
        assert run_stage("distill-student-blkd", _with(cfg, cat, **over), cat, seed=0, force=True)["best_val_acc"] > 0.2
    with pytest.raises(CheckpointError, match="does not fit tv:resnet34"):
        run_stage("train-teacher", _with(cfg, cat, **{"teacher.checkpoint": str(path), "teacher.arch": "tv:resnet34"}),
                  cat)
