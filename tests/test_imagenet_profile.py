"""profiles/imagenet.yaml, the TAKD paper's ImageNet row, run on a generated image folder of many classes: the same
stages, models and settings, with the splits streamed from the prepared store and every cache read by row, as they
would be for 1.28 M images. Only the sizes are overridden (image size, epochs, batch, seeds, device)."""
from __future__ import annotations

import json

import torch

from models import build_model
from tasks.catalog import Catalog
from tasks.config import load_config
from tasks.stages import run_stage
from tests.fakes import write_image_folder

CLASSES = 100


def test_the_imagenet_profile_runs_teacher_ta_student_through_the_disk_store(tmp_path):
    root = tmp_path / "imagenet"
    write_image_folder(root / "train", classes=CLASSES, per_class=4, size=40)
    write_image_folder(root / "test", classes=CLASSES, per_class=1, size=40)
    weights = tmp_path / "resnet50.pth"
    torch.save(build_model("tv:resnet50", 3, CLASSES, 32, 0).state_dict(), weights)
    # the recipe's lr 0.1 on 11 steps of an untrained ResNet-34 overflows fp16 logits: a smoke test needs calm
    quick = {"epochs": 1, "batch_size": 32, "eval_batch_size": 64, "compile": False, "lr": 0.01}
    cfg = load_config(None, {
        "profile": "imagenet", "device": "cpu", "data.name": f"imagefolder:{root}", "data.image_size": 32,
        "data.val_fraction": 0.1, "data.memory_budget_mb": 0, "data.loader_workers": 2,
        "teacher.checkpoint": str(weights), "student.seeds": [0], "cache.batch_size": 64,
        **{f"{role}.train.{k}": v for role in ("assistant", "student") for k, v in quick.items()}})
    assert (cfg.teacher.arch, cfg.assistant.arch, cfg.student.arch) == ("tv:resnet50", "tv:resnet34", "tv:resnet18")
    cat = Catalog(tmp_path / "project")
    for stage, seed in (("prepare-data", None), ("train-teacher", None), ("cache-teacher", None),
                        ("distill-assistant", None), ("cache-assistant", None), ("distill-student-takd", 0)):
        run_stage(stage, cfg, cat, seed=seed)
    caches = [json.loads((cat.soft_targets(m) / "manifest.json").read_text()) for m in ("teacher", "assistant")]
    assert all(c["shape"] == [cfg.cache.views, 360, CLASSES] for c in caches)
    student = json.loads((cat.model("student-takd-s0") / "model.json").read_text())
    assert student["arch"] == "tv:resnet18" and len(student["classes"]) == CLASSES
    assert set(student["data_placement"].values()) == {"disk"} and student["cache_read"] == "by row"
