"""Stage export: the shipped student as a torch.export program (`.pt2`) and ONNX, each loaded back, run and
compared with PyTorch on test images (the largest absolute difference is reported, and too large a one is
refused), plus its labels, preprocessing and model card."""
from __future__ import annotations

import json
import logging

import torch

from engine.atomic import atomic_path, save_json
from engine.errors import KDError
from engine.export import Deployable, onnx_max_abs_diff, pt2_max_abs_diff, to_onnx, to_pt2
from engine.quantize import calibration_images, int8_file, measure
from engine.trainer import predict
from engine.spec import TrainSpec
from models.views import Viewed
from engine.workspace import Workspace, read_meta
from tasks import tracking
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.model_card import model_card
from tasks.run_context import RunContext
from tasks.stage import StageRun, require
from tasks.stages import specs

PT2_FILE, ONNX_FILE, LABELS_FILE, PREPROCESS_FILE, CARD_FILE = (
    "model.pt2", "model.onnx", "labels.json", "preprocessing.json", "model_card.md")
log = logging.getLogger("kd")


def best_student(cat: Catalog, models: dict[str, TrainSpec]) -> str:
    """The student to ship: best on validation over every method and seed, never chosen by the test split."""
    return max((n for n, s in models.items() if s.role == "student"),
               key=lambda n: json.loads(cat.evaluation(n).read_text()).get("best_val_acc") or 0)


def chosen_model(cfg: PipelineConfig, cat: Catalog, models: dict[str, TrainSpec]) -> str:
    name = cfg.export.model or best_student(cat, models)
    if name not in models:
        raise KDError(f"export.model: unknown model {name!r}; the pipeline's models are {', '.join(models)}")
    return name


def _chain(cat: Catalog, s: TrainSpec) -> list[dict]:
    """The student and every model it learnt from (fine-tuning's init is its own past, skipped)."""
    out = []
    node: TrainSpec | None = s
    while node is not None:
        meta = read_meta(cat.model(node.name))
        evaluation = json.loads(cat.evaluation(node.name).read_text())
        out.append({**meta, **evaluation, "name": node.name, "kd": node.kd if node.guides else None})
        node = (node.guides or (node.init.guides if node.init else ()) or (None,))[0]
    return out


def formats(cfg: PipelineConfig, ws: Workspace, model: Deployable, out) -> dict[str, dict]:
    """The fp32 files and the INT8 one (ONNX Runtime), each run on the whole test split:
    accuracy, its change from the fp32 model, agreement with it, size and CPU speed. An INT8 file that loses
    more than quantize.max_drop is flagged, in the result, the log and the model card."""
    calibration = calibration_images(ws.train, cfg.quantize.calibration_images, cfg.quantize.calibration_seed)
    int8 = int8_file(out / ONNX_FILE, calibration)
    images, labels = ws.test.x.cpu().float() / 255, ws.test.y.cpu()
    reference = predict(model.model, ws.test).argmax(1).cpu()
    fp32_acc = (reference == labels).float().mean().item()
    found = {}
    for kind, path in (("fp32 ONNX", out / ONNX_FILE), ("fp32 torch.export", out / PT2_FILE), ("INT8 ONNX", int8)):
        figures = measure(path, images, labels, reference, cfg.evaluate.speed_repeats)
        figures["acc_change"] = figures["test_acc"] - fp32_acc
        figures["within_tolerance"] = figures["acc_change"] >= -cfg.quantize.max_drop
        if not figures["within_tolerance"]:
            log.warning("%s: %s loses %.2f points of test accuracy, more than quantize.max_drop = %.2f; "
                        "ship the fp32 file, or train with QAD", path, kind, -100 * figures["acc_change"],
                        100 * cfg.quantize.max_drop)
        found[kind] = figures
    return found


def work(run: StageRun) -> dict:
    cfg, cat, out = run.cfg, run.cat, run.out
    models = specs(cfg)
    name = chosen_model(cfg, cat, models)
    ws = Workspace(cat.prepared, "cpu", cfg.data)
    model = Deployable(ws.load_model_dir(cat.model(name)), ws.mean, ws.std)
    images = ws.test.x[: cfg.export.check_images].float() / 255
    to_pt2(model, images[:4], out / PT2_FILE)
    to_onnx(model, images[:4], out / ONNX_FILE)
    diffs = {"pt2_max_abs_diff": pt2_max_abs_diff(out / PT2_FILE, model, images),
             "onnx_max_abs_diff": onnx_max_abs_diff(out / ONNX_FILE, model, images)}
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > cfg.export.max_abs_diff:
        raise KDError(f"{out}: {worst} = {diffs[worst]:.3g} exceeds export.max_abs_diff = {cfg.export.max_abs_diff}")
    found = formats(cfg, ws, model, out)
    classes = ws.splits.classes
    save_json({str(i): c for i, c in enumerate(classes)}, out / LABELS_FILE)
    save_json({"input_shape": list(ws.splits.input_shape), "value_range": [0.0, 1.0], "mean": ws.mean,
               "std": ws.std, "layout": "NCHW, float32; normalised inside the model",
               **({"modalities": ws.splits.modalities} if ws.splits.modalities else {}),
               **({"reads": model.model.input} if isinstance(model.model, Viewed) else {})}, out / PREPROCESS_FILE)
    data = {**require(cat.prepared, "the prepared data set")["result"], "mean": [round(v, 4) for v in ws.mean],
            "std": [round(v, 4) for v in ws.std]}
    selected = "by export.model" if cfg.export.model else "as the student with the best validation accuracy"
    export = {**diffs, "check_images": len(images), "selected": selected, "formats": found,
              "max_drop": cfg.quantize.max_drop, "calibration_images": cfg.quantize.calibration_images,
              "flagged": [k for k, v in found.items() if not v["within_tolerance"]]}
    with atomic_path(out / CARD_FILE) as tmp:
        tmp.write_text(model_card(name, _chain(cat, models[name]), data, export))
    files = [PT2_FILE, ONNX_FILE, *(v["file"] for k, v in found.items() if k.startswith("INT8")),
             LABELS_FILE, PREPROCESS_FILE, CARD_FILE]
    return {"model": name, **export, "files": files,
            "torch": torch.__version__, "mlflow_run_id": require(cat.model(name), name)["result"].get("mlflow_run_id")}


def register(cfg: PipelineConfig, cat: Catalog, ctx: RunContext, result: dict) -> dict:
    """The exported student is the registered champion: registered when the alias points elsewhere,
    whether the export ran now or was reused."""
    run_id = result.get("mlflow_run_id")
    if not (ctx.tracking and run_id and cfg.tracking.log_models):
        return {"registered": None}
    registered = tracking.register(ctx, run_id, cfg.tracking.registered_model, cfg.tracking.alias)
    return {"registered": registered and registered | {"model": result["model"]}}
