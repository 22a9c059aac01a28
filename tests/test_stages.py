"""The stages as functions: outputs, reuse, what a change invalidates, importing a teacher."""
import json

import pytest
import torch

from engine.errors import CacheMismatchError, CheckpointError
from tasks.config import load_config
from tasks.stages import STAGES
from tests.conftest import tiny_overrides


def run_all(cfg, cat):
    return {name: fn(cfg, cat, False) for name, fn in STAGES.items()}


def test_pipeline_outputs_and_reuse(project):
    cfg, cat = project
    first = run_all(cfg, cat)
    assert not any(r["reused"] for r in first.values())
    metrics = json.loads((cat.metrics / "comparison.json").read_text())
    assert set(metrics) == {"teacher", "assistant", "nokd", "blkd", "takd", "takd_ft"}
    assert all(0 <= m["test_acc"] <= 1 for m in metrics.values())
    for f in ("comparison.md", "comparison.csv", "comparison.png", "curves.png"):
        assert (cat.reports / f).stat().st_size > 0
    manifest = json.loads((cat.soft_targets("teacher") / "manifest.json").read_text())
    assert manifest["key"]["views"] == cfg.cache.views and manifest["shape"][0] == cfg.cache.views
    ev = json.loads(cat.evaluation("student-takd").read_text())
    assert {"test_acc", "test_top5", "per_class_acc", "confusion", "params", "size_bytes", "flops",
            "latency_ms_b1", "throughput_b256", "teacher_agreement"} <= set(ev)
    assert sum(map(sum, ev["confusion"])) == ev["num_test"]
    assert not cat.work("teacher").exists()  # epoch checkpoints are cleaned up after success

    again = run_all(cfg, cat)
    assert all(r["reused"] for r in again.values())

    # A student parameter reruns only the student stages and what depends on them.
    changed = cfg.model_copy(update={"student": cfg.student.model_copy(update={"seed": 1})})
    third = run_all(changed, cat)
    rerun = {name for name, r in third.items() if not r["reused"]}
    assert rerun == {"train-student-nokd", "distill-student-blkd", "distill-student-takd", "fine-tune-student",
                     "evaluate", "report", "export"}


def test_same_config_same_results(project, tmp_path_factory, fashion_dir):
    from tasks.catalog import Catalog

    cfg, cat = project
    other = Catalog(tmp_path_factory.mktemp("again"))
    for name in ("prepare-data", "train-teacher", "cache-teacher", "distill-student-blkd"):
        STAGES[name](cfg, cat, False)
        STAGES[name](cfg, other, False)
    a = torch.load(cat.model("student-blkd") / "model.pt", weights_only=True)
    b = torch.load(other.model("student-blkd") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stale_soft_targets_are_refused(project):
    cfg, cat = project
    for name in ("prepare-data", "train-teacher", "cache-teacher"):
        STAGES[name](cfg, cat, False)
    manifest = json.loads((cat.soft_targets("teacher") / "manifest.json").read_text())
    manifest["key"]["model_fingerprint"] = "feedfacefeedface"
    (cat.soft_targets("teacher") / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="model_fingerprint: cache has 'feedfacefeedface', request needs"):
        STAGES["distill-assistant"](cfg, cat, False)


def test_import_a_pretrained_teacher(project, tmp_path):
    cfg, cat = project
    STAGES["prepare-data"](cfg, cat, False)
    from models import build_model

    torch.manual_seed(5)
    ckpt = tmp_path / "mine.pt"
    torch.save(build_model("plain-4", 1, 10, 28).state_dict(), ckpt)
    imported = load_config(None, {**tiny_overrides_from(cfg), "teacher.checkpoint": str(ckpt)})
    STAGES["train-teacher"](imported, cat, False)
    meta = json.loads((cat.model("teacher") / "model.json").read_text())
    assert meta["arch"] == "plain-4" and meta["best_epoch"] == 0

    torch.save(build_model("plain-4", 1, 7, 28).state_dict(), ckpt)  # a 7-class teacher
    with pytest.raises(CheckpointError, match=r"does not fit plain-4 for 10 classes and 1x28x28 inputs: .*\(7, "):
        STAGES["train-teacher"](imported, cat, False)


def tiny_overrides_from(cfg):
    from pathlib import Path

    return tiny_overrides(Path(cfg.data.source_dir), Path(cfg.data.root).parent)
