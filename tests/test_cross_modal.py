"""Cross-modal distillation (issue 26): paired inputs from a CSV with a path column per modality, views a model reads
(a modality, a lower resolution, an edge map), and a teacher and a student that read different ones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import DataConfig
from engine.data import Splits, load_splits
from engine.errors import DataError, KDError
from engine.workspace import Workspace
from models import build_model
from models.views import Edges, LowRes, parse, view
from tasks.config import load_config
from tasks.stages import run_stage
from tests.conftest import tiny_overrides
from tests.fakes import write_image_folder


def _paired_csv(root: Path, header: str = "path.photo,path.sketch,label,split") -> Path:
    """Two modalities of 12 examples: the class's coloured image, and the same image flipped upside down."""
    from PIL import Image

    write_image_folder(root / "photo", classes=2, per_class=6, size=12)
    rows = []
    for c in range(2):
        for i in range(6):
            photo = root / "photo" / f"class_{c}" / f"{i}.png"
            sketch = root / "sketch" / f"{c}-{i}.png"
            sketch.parent.mkdir(exist_ok=True)
            with Image.open(photo) as im:
                im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(sketch)
            rows.append(f"{photo.relative_to(root)},{sketch.relative_to(root)},{'ab'[c]},{'test' if i == 0 else 'train'}")
    path = root / "pairs.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_a_paired_csv_stores_its_modalities_side_by_side_and_keeps_their_names(tmp_path):
    cfg = DataConfig(name=f"csv:{_paired_csv(tmp_path)}", image_size=12, channels=3, val_fraction=0.2)
    splits = load_splits(cfg)
    assert splits.modalities == ["photo", "sketch"] and splits.input_shape == (6, 12, 12)
    x = splits.train.x
    assert torch.equal(x[:, 3:], x[:, :3].flip(2))  # the sketch channels are the photo's, flipped: rows are paired
    stored = Splits.read(Path(tmp_path / "store")) if splits.write(tmp_path / "store") else None
    assert stored.modalities == ["photo", "sketch"] and stored.fingerprint() == splits.fingerprint()
    unpaired = Splits(**{**splits.__dict__, "modalities": None})
    assert unpaired.fingerprint() != splits.fingerprint()  # the names are part of what was prepared


@pytest.mark.parametrize("header, why", [
    ("path.photo,path.sketch,y,split", "needs a header with columns path,label, or path.<modality> columns"),
    ("path.photo,path.edges,label,split", r"column 'path.edges': a modality is named by .* not after a derived view"),
])
def test_paired_csv_faults_are_named(tmp_path, header, why):
    with pytest.raises(DataError, match=why):
        load_splits(DataConfig(name=f"csv:{_paired_csv(tmp_path, header)}", image_size=12, channels=3))


def test_an_empty_modality_cell_names_its_line(tmp_path):
    path = _paired_csv(tmp_path)
    lines = path.read_text().splitlines()
    lines[3] = ",".join(["", *lines[3].split(",")[1:]])  # CSV line 4 without its photo
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"pairs.csv: line 4: empty path.photo or path.sketch or label"):
        load_splits(DataConfig(name=f"csv:{path}", image_size=12, channels=3))


def test_views_compute_what_they_say():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8)
    low = LowRes(4, 8)(x)
    assert torch.equal(low[0, 0, :4, :4], x[0, 0, :4, :4].mean().expand(4, 4))
    assert torch.equal(low[0, 1, 4:, :4], x[0, 1, 4:, :4].mean().expand(4, 4))
    step = torch.zeros(1, 1, 5, 5)
    step[..., 3:] = 1.0  # a vertical edge between columns 2 and 3
    e = Edges(1)(step)[0, 0]
    assert torch.allclose(e[2, 2:4], torch.tensor([4.0, 4.0])) and e[2, 0] < 1e-5  # Sobel's 1-2-1 sums to 4
    sketch, c = view("sketch/edges", ["photo", "sketch"], 6, 12, "pairs")
    pair = torch.randn(2, 6, 12, 12)
    assert c == 3 and torch.allclose(sketch(pair), Edges(3)(pair[:, 3:]))
    assert parse("lowres-2") == (None, [("lowres", 2)])
    with pytest.raises(ValueError, match="'blur' is neither a derived view"):
        parse("photo/blur")
    with pytest.raises(ValueError, match="no modality 'depth'; its modalities are photo, sketch"):
        view("depth", ["photo", "sketch"], 6, 12, "pairs")


def test_a_model_that_reads_a_view_is_saved_and_loaded_with_it(project):
    cfg, cat = project
    run_stage("prepare-data", cfg, cat)
    ws = Workspace(cat.prepared, "cpu")
    with pytest.raises(KDError, match="plain-2: input 'depth': fashion-mnist has no modality 'depth'"):
        ws.build("plain-2", input="depth")
    model = ws.build("plain-2", seed=0, input="lowres-4")
    ws.save_model(tmp := cat.root / "m", model, {"name": "m"}, [])
    assert json.loads((tmp / "model.json").read_text())["input"] == "lowres-4"
    back = ws.load_model_dir(tmp).eval()
    x = ws.test.normalize(ws.test.x[:4])
    assert torch.equal(back(x), model.eval()(x))
    blurred = F.interpolate(F.avg_pool2d(x, 4), size=28, mode="nearest")
    assert torch.allclose(back(blurred), back(x), atol=1e-5)  # it sees only the pooled image


def test_cross_modal_distillation_teacher_and_student_read_their_own_modality(tmp_path, fashion_dir, monkeypatch):
    """The teacher trains on the photos, its cache is made from them, and the student, which reads only the
    sketches, learns from that cache; neither model's outputs move when the other modality changes."""
    from tasks.catalog import Catalog

    monkeypatch.setenv("KD_PROJECT_ROOT", str(tmp_path))
    csv = _paired_csv(tmp_path / "own")
    cfg = load_config(None, {**tiny_overrides(fashion_dir, tmp_path), "data.name": f"csv:{csv}", "data.image_size": 12,
                             "data.channels": 3, "data.val_fraction": 0.2, "teacher.input": "photo",
                             "student.input": "sketch", "student.seeds": [0]})
    cat = Catalog(tmp_path)
    for stage in ("prepare-data", "train-teacher", "cache-teacher"):
        run_stage(stage, cfg, cat)
    run_stage("distill-student-blkd", cfg, cat, seed=0)
    ws = Workspace(cat.prepared, "cpu")
    teacher, student = (ws.load_model_dir(cat.model(n)).eval() for n in ("teacher", "student-blkd-s0"))
    assert (teacher.input, student.input) == ("photo", "sketch")
    x = ws.train.normalize(ws.train.x[:4])
    other = x.clone()
    other[:, :3] = torch.randn_like(other[:, :3])  # another photo, the same sketch
    assert torch.equal(student(other), student(x)) and not torch.allclose(teacher(other), teacher(x))
    other = x.clone()
    other[:, 3:] = torch.randn_like(other[:, 3:])  # the same photo, another sketch
    assert torch.equal(teacher(other), teacher(x)) and not torch.allclose(student(other), student(x))
    meta = json.loads((cat.model("student-blkd-s0") / "model.json").read_text())
    assert meta["input"] == "sketch" and meta["input_shape"] == [6, 12, 12]


def test_an_imported_teacher_reads_its_view_from_bare_weights_and_a_program_is_refused(project, tmp_path):
    from tests.test_own_data import _exported

    cfg, cat = project
    run_stage("prepare-data", cfg, cat)
    torch.manual_seed(5)
    net = build_model("plain-4", 1, 10, 28)
    torch.save(net.state_dict(), weights := tmp_path / "teacher.pt")
    over = {**tiny_overrides(Path(cfg.data.source_dir), cat.root), "teacher.input": "lowres-4"}
    run_stage("train-teacher", load_config(None, {**over, "teacher.checkpoint": str(weights)}), cat)
    ws = Workspace(cat.prepared, "cpu")
    teacher = ws.load_model_dir(cat.model("teacher")).eval()
    x = ws.test.normalize(ws.test.x[:4])
    assert teacher.input == "lowres-4" and torch.allclose(teacher(x), net.eval()(LowRes(4, 28)(x)), atol=1e-6)
    program = _exported(net, tmp_path / "teacher.pt2")
    with pytest.raises(KDError, match="teacher.input 'lowres-4' needs a model the pipeline builds"):
        run_stage("train-teacher", load_config(None, {**over, "teacher.checkpoint": str(program)}), cat)


def test_a_view_that_does_not_fit_and_a_start_that_reads_another_input_are_refused(project):
    cfg, cat = project
    run_stage("prepare-data", cfg, cat)
    with pytest.raises(KDError, match="28-pixel images do not divide into 3 x 3 cells"):
        Workspace(cat.prepared, "cpu").build("plain-2", input="lowres-3")
    over = {**tiny_overrides(Path(cfg.data.source_dir), cat.root), "student.seeds": [0]}
    for stage in ("train-teacher", "cache-teacher", "distill-assistant", "cache-assistant"):
        run_stage(stage, cfg, cat)
    run_stage("distill-student-takd", load_config(None, over), cat, seed=0)
    with pytest.raises(KDError, match="starts from student-takd-s0, which reads the whole input, but reads edges"):
        run_stage("fine-tune-student", load_config(None, {**over, "student.input": "edges"}), cat, seed=0)


def test_an_unpaired_csv_keeps_its_extra_path_columns_as_data(tmp_path):
    def load(header: str) -> Splits:
        path = _paired_csv(tmp_path / header.replace(",", "-"), header=header)
        return load_splits(DataConfig(name=f"csv:{path}", image_size=12, channels=3, val_fraction=0.2))

    splits, plain = load("path,path.sketch,label,split"), load("path,sketch,label,split")
    assert splits.modalities is None and torch.equal(splits.train.x, plain.train.x)  # the path column's images


def test_predict_refuses_a_paired_student_with_what_to_do(tmp_path):
    from tasks.predict import load_images

    (tmp_path / "preprocessing.json").write_text(json.dumps({"input_shape": [6, 12, 12],
                                                             "modalities": ["photo", "sketch"]}))
    with pytest.raises(KDError, match="takes 2 paired inputs side by side \\(photo, sketch\\)"):
        load_images(["a.png"], tmp_path)
