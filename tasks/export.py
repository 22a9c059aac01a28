"""Stage export: the shipped student as TorchScript and ONNX, each run and compared with
PyTorch on test images (the largest absolute difference is reported, and too large a one is
refused), plus its labels, preprocessing and model card."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.atomic import atomic_path, save_json
from engine.errors import KDError
from engine.export import Deployable, onnx_max_abs_diff, to_onnx, to_torchscript, torchscript_max_abs_diff
from tasks.catalog import MODELS, Catalog, lineage
from tasks.config import PipelineConfig
from tasks.context import Workspace, read_meta
from tasks.model_card import model_card
from tasks.report import best_student
from tasks.stage import read_stage, run_once, stage_key
from tasks.train_model import hop_kd

TORCHSCRIPT_FILE, ONNX_FILE, LABELS_FILE, PREPROCESS_FILE, CARD_FILE = (
    "model.ts", "model.onnx", "labels.json", "preprocessing.json", "model_card.md")


def chosen_model(cfg: PipelineConfig, cat: Catalog) -> str:
    name = cfg.export.model or best_student(cat)
    if name not in MODELS:
        raise KDError(f"export.model: unknown model {name!r}; the pipeline's models are {', '.join(MODELS)}")
    return name


def _chain(cfg: PipelineConfig, cat: Catalog, name: str) -> list[dict]:
    """The student and every model it learnt from (fine-tuning's init is its own past, skipped)."""
    out = []
    for m in lineage(name):
        if out and MODELS[out[-1]["name"]][3] == m:
            continue
        meta = read_meta(cat.model(m))
        evaluation = json.loads(cat.evaluation(m).read_text())
        source = MODELS[m][2]
        out.append({**meta, **evaluation, "name": m, "kd": hop_kd(cfg, m) if source else None})
    return out


def export_student(cfg: PipelineConfig, cat: Catalog, force: bool = False) -> dict:
    name = chosen_model(cfg, cat)
    inputs = {"model": stage_key(cat.model(name), name), "evaluate": stage_key(cat.eval_dir, "the evaluation"),
              "export": cfg.export.model_dump(), "name": name}

    def work(key: str, out: Path) -> dict:
        ws = Workspace(cat, "cpu")
        model = Deployable(ws.load_model(name), ws.mean, ws.std)
        images = ws.test.x[: cfg.export.check_images].float() / 255
        to_torchscript(model, images[:4], out / TORCHSCRIPT_FILE)
        to_onnx(model, images[:4], out / ONNX_FILE)
        diffs = {"torchscript_max_abs_diff": torchscript_max_abs_diff(out / TORCHSCRIPT_FILE, model, images),
                 "onnx_max_abs_diff": onnx_max_abs_diff(out / ONNX_FILE, model, images)}
        worst = max(diffs, key=diffs.get)
        if diffs[worst] > cfg.export.max_abs_diff:
            raise KDError(f"{out}: {worst} = {diffs[worst]:.3g} exceeds export.max_abs_diff = {cfg.export.max_abs_diff}")
        classes = ws.splits.classes
        save_json({str(i): c for i, c in enumerate(classes)}, out / LABELS_FILE)
        save_json({"input_shape": list(ws.splits.input_shape), "value_range": [0.0, 1.0], "mean": ws.mean,
                   "std": ws.std, "layout": "NCHW, float32; normalised inside the model"}, out / PREPROCESS_FILE)
        data = {**read_stage(cat.prepared)["result"], "mean": [round(v, 4) for v in ws.mean],
                "std": [round(v, 4) for v in ws.std]}
        selected = "by export.model" if cfg.export.model else "as the student with the best validation accuracy"
        export = {**diffs, "check_images": len(images), "selected": selected}
        with atomic_path(out / CARD_FILE) as tmp:
            tmp.write_text(model_card(name, _chain(cfg, cat, name), data, export))
        return {"model": name, **export, "files": [TORCHSCRIPT_FILE, ONNX_FILE, LABELS_FILE, PREPROCESS_FILE, CARD_FILE],
                "torch": torch.__version__}

    return run_once(cat, "export", "export", cat.export, inputs, work, force)
