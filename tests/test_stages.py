"""The stages as functions: outputs, reuse, what a change invalidates, importing a teacher."""
import json

import pytest
import torch

from engine.errors import CacheMismatchError, CheckpointError
from tasks.config import load_config
from tasks.stages import STAGES, dotted, instances, run_instance, run_stage
from tests.conftest import tiny_overrides


def run_all(cfg, cat) -> dict:
    return {i.id: run_instance(i, cfg, cat) for i in instances(cfg)}


def test_pipeline_outputs_and_reuse(project, monkeypatch):
    cfg, cat = project
    cfg = cfg.model_copy(update={"quantize": cfg.quantize.model_copy(update={"evaluate": True, "qad_epochs": 1})})
    first = run_all(cfg, cat)
    assert not any(r["reused"] for r in first.values())
    assert len(first) == 4 + 5 * len(cfg.student.seeds) + 4  # data, teacher + cache, TA + cache; students; eval, report, export
    metrics = json.loads((cat.metrics / "comparison.json").read_text())
    assert {"teacher", "assistant", "nokd", "blkd", "takd", "takd_ft", "takd_qad", "takd_minus_blkd", "blkd_minus_nokd",
            "int8_fp32", "int8_ptq", "int8_qad", "int8_ptq_minus_fp32", "int8_qad_minus_ptq"} <= set(metrics)
    for f in ("comparison.md", "comparison.csv", "comparison.json", "comparison.png", "curves.png"):
        assert (cat.reports / f).stat().st_size > 0
    manifest = json.loads((cat.soft_targets("teacher") / "manifest.json").read_text())
    assert manifest["key"]["views"] == cfg.cache.views and manifest["shape"][0] == cfg.cache.views
    ev = json.loads(cat.evaluation("student-takd-s1").read_text())
    assert {"test_acc", "test_top5", "per_class_acc", "confusion", "params", "size_bytes", "flops",
            "latency_ms_b1", "throughput_b256", "teacher_agreement"} <= set(ev) and ev["seed"] == 1
    assert sum(map(sum, ev["confusion"])) == ev["num_test"]
    assert not cat.work("teacher").exists()  # epoch checkpoints are cleaned up after success
    qad = json.loads(cat.evaluation("student-takd-qad-s1").read_text())
    assert qad["method"] == "QAD" and qad["int8_size_bytes"] < 0.6 * qad["onnx_size_bytes"] and qad["int8_agreement"] > 0
    assert set(first["export"]["formats"]) == {"fp32 ONNX", "fp32 torch.export", "INT8 ONNX"}
    assert all((cat.export / f).exists() for f in first["export"]["files"]) and "model.int8.onnx" in first["export"]["files"]
    (cat.metrics / "comparison.json").unlink()  # published again by a reused report
    (cat.metrics / "curves" / "gone-s9.json").write_text("[]")  # a curve no model has any more
    assert all(r["reused"] for r in run_all(cfg, cat).values())
    assert json.loads((cat.metrics / "comparison.json").read_text()) == metrics
    assert not (cat.metrics / "curves" / "gone-s9.json").exists()

    # Calibrated on blank images, INT8 clips every activation: the export says so, in its result and card.
    assert not first["export"]["flagged"]
    import tasks.export

    monkeypatch.setattr(tasks.export, "calibration_images", lambda train, n, seed: torch.zeros(8, 1, 28, 28))
    result = run_stage("export", cfg, cat, force=True)
    assert "INT8 ONNX" in result["flagged"] and not result["formats"]["INT8 ONNX"]["within_tolerance"]
    assert "fp32 ONNX" not in result["flagged"]
    assert "**NO**" in (cat.export / "model_card.md").read_text()


def test_same_config_same_results(project, tmp_path_factory, fashion_dir):
    from tasks.catalog import Catalog

    cfg, cat = project
    other = Catalog(tmp_path_factory.mktemp("again"))
    for name in ("prepare-data", "train-teacher", "cache-teacher"):
        run_stage(name, cfg, cat)
        run_stage(name, cfg, other)
    run_stage("distill-student-blkd", cfg, cat, seed=1)
    run_stage("distill-student-blkd", cfg, other, seed=1)
    a = torch.load(cat.model("student-blkd-s1") / "model.pt", weights_only=True)
    b = torch.load(other.model("student-blkd-s1") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stale_soft_targets_are_refused(project):
    cfg, cat = project
    for name in ("prepare-data", "train-teacher", "cache-teacher"):
        run_stage(name, cfg, cat)
    manifest = json.loads((cat.soft_targets("teacher") / "manifest.json").read_text())
    manifest["key"]["model_fingerprint"] = "feedfacefeedface"
    (cat.soft_targets("teacher") / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="model_fingerprint: cache has 'feedfacefeedface', request needs"):
        run_stage("distill-assistant", cfg, cat)


def test_a_stage_names_the_upstream_it_lacks(project):
    cfg, cat = project
    run_stage("prepare-data", cfg, cat)
    with pytest.raises(Exception, match=r"data/models/teacher: distill-student-blkd@0 reads the output of "
                                        r"train-teacher, which has not been produced yet"):
        run_stage("distill-student-blkd", cfg, cat, seed=0)
    with pytest.raises(Exception, match=r"seed 7 is not in student.seeds \[0, 1\]"):
        run_stage("train-student-nokd", cfg, cat, seed=7)


def test_import_a_pretrained_teacher(project, tmp_path):
    cfg, cat = project
    run_stage("prepare-data", cfg, cat)
    from models import build_model

    torch.manual_seed(5)
    ckpt = tmp_path / "mine.pt"
    torch.save(build_model("plain-4", 1, 10, 28).state_dict(), ckpt)
    imported = load_config(None, {**tiny_overrides_from(cfg), "teacher.checkpoint": str(ckpt)})
    run_stage("train-teacher", imported, cat)
    meta = json.loads((cat.model("teacher") / "model.json").read_text())
    assert meta["arch"] == "plain-4" and meta["best_epoch"] == 0

    torch.save(build_model("plain-4", 1, 7, 28).state_dict(), ckpt)  # a 7-class teacher
    with pytest.raises(CheckpointError, match=r"does not fit plain-4 for 10 classes and 1x28x28 inputs: .*\(7, "):
        run_stage("train-teacher", imported, cat)


def test_a_folder_holding_the_pipelines_outputs_cannot_be_an_input(project, tmp_path):
    """A CSV listing images here and in the project's data/ makes their common folder, the project itself, an
    input: prepare-data would read its own outputs, and never be up to date."""
    from engine.errors import KDError
    from tests.fakes import write_image_folder

    cfg, cat = project
    write_image_folder(cat.root / "imgs", classes=2, per_class=3, size=12)
    write_image_folder(cat.data / "more", classes=2, per_class=1, size=12)
    rows = [f"imgs/class_{c}/{i}.png,{c}" for c in range(2) for i in range(3)] + ["data/more/class_0/0.png,0"]
    (cat.root / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    bad = cfg.model_copy(update={"data": cfg.data.model_copy(update={"name": f"csv:{cat.root / 'labels.csv'}"})})
    with pytest.raises(KDError, match=r"prepare-data would read this as an input, but it overlaps the pipeline's output"):
        run_stage("prepare-data", bad, cat)


def test_the_table_is_in_dependency_order():
    seen = set()
    for name, stage in STAGES.items():
        assert set(stage.needs) <= seen, name
        seen.add(name)


def tiny_overrides_from(cfg):
    from pathlib import Path

    return tiny_overrides(Path(cfg.data.source_dir), Path(cfg.data.root).parent)


def test_the_docs_show_the_stage_table_as_the_code_declares_it():
    from pathlib import Path

    from tasks.stages import markdown

    root = Path(__file__).resolve().parents[1]
    assert markdown(load_config(root / "params.yaml")) in (root / "docs" / "architecture.md").read_text(), \
        "paste `python -m tasks stages` into docs/architecture.md's section 'One stage table'"


def _other_value(key: str, field, value):
    """A different valid-looking value for a config field, or None when there is none to try."""
    import typing

    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, list):
        return value + value[-1:] if value else None
    options = [a for t in (field.annotation, *typing.get_args(field.annotation))
               for a in typing.get_args(t) if isinstance(a, str)]
    if options:
        return next((o for o in options if o != value), None)
    if key.endswith("arch") or key.endswith("peers"):
        return "plain-6"
    if value is None:
        return {"teacher.checkpoint": "own/teacher.pt", "teacher.predictions": None}.get(key, None)
    return {"data.name": "cifar10", "device": "cpu"}.get(key, value + "-changed" if isinstance(value, str) else None)


def test_a_trainings_spec_reads_only_what_dvc_yaml_tracks_for_it():
    """DVC reruns a stage when a param it lists changes; a training's key moves when its TrainSpec does. So the spec
    may depend only on the config fields its stage lists, or a stage upstream of it (whose output then changes):
    every other field is changed in turn here, and no training's spec may move."""
    from tasks.cli import _leaf_fields
    from tasks.config import ConfigError, PipelineConfig
    from tasks.stages import needed

    cfg = PipelineConfig()
    tried = 0
    for inst in instances(cfg, seed=0):
        if not inst.stage.model:
            continue
        listed = {"profile"} | {p for up in needed(cfg, [inst.stage.name]) for p in up.stage.params}
        before = inst.spec(cfg).identity()
        for key, field in _leaf_fields(PipelineConfig):
            if any(key == p or key.startswith(p + ".") for p in listed):
                continue
            try:
                current = dotted(cfg, key)
            except TypeError:  # inside an unset optional section (student.kd): the field's own default
                current = field.get_default(call_default_factory=True)
            value = _other_value(key, field, current)
            try:
                changed = load_config(None, {key: value}) if value is not None else None
            except ConfigError:
                changed = None
            if changed is None or changed == cfg:
                continue
            tried += 1
            assert inst.spec(changed).identity() == before, f"{inst.id}'s TrainSpec reads {key}, which dvc.yaml " \
                                                              f"does not list for it"
    assert tried > 500  # most fields of the schema, for each of the seven trainings


def test_a_stage_and_every_stage_it_reads_from():
    from tasks.config import PipelineConfig
    from tasks.stages import needed

    cfg = PipelineConfig(student={"seeds": [0, 1]})
    assert [i.id for i in needed(cfg, ["distill-student-takd"])] == [
        "prepare-data", "train-teacher", "cache-teacher", "distill-assistant", "cache-assistant",
        "distill-student-takd@0", "distill-student-takd@1"]
    assert [i.id for i in needed(cfg, ["prepare-data"])] == ["prepare-data"]
    with pytest.raises(Exception, match=r"unknown stage 'distil-assistant'; stages: prepare-data, train-teacher"):
        needed(cfg, ["distil-assistant"])
