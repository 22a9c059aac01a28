"""Stage evaluate: every trained model on the test split, which nothing else ever reads; the end of the
QAD chain (the student QAD starts from, and the QAD student) also as an INT8 ONNX file."""
from __future__ import annotations

import tempfile
from pathlib import Path

from engine.atomic import save_json
from engine.device import cpu_name
from engine.evaluate import evaluate
from engine.export import Deployable, to_onnx
from engine.quantize import calibration_images, int8_file, measure
from engine.trainer import predict
from engine.spec import TrainSpec
from engine.workspace import Workspace, read_meta
from tasks import tracking
from tasks.config import PipelineConfig
from tasks.stage import StageRun, read_stage
from tasks.stages import specs


def int8_candidates(models: dict[str, TrainSpec]) -> set[str]:
    """The QAD students and the models they start from: PTQ of the one against QAD of the other."""
    qad = [s for s in models.values() if s.quantized]
    return {s.name for s in qad} | {s.init.name for s in qad if s.init}


def int8_metrics(cfg: PipelineConfig, ws: Workspace, model_dir: Path, fp32_pred) -> dict:
    """The model exported to ONNX and quantized statically with ONNX Runtime: 'int8_*' figures, and 'onnx_*'
    figures of the fp32 file beside them (the same runtime, so speed compares like with like)."""
    model = Deployable(ws.load_model_dir(model_dir), ws.mean, ws.std)
    images, labels = ws.test.x.cpu().float() / 255, ws.test.y.cpu()
    calibration = calibration_images(ws.train, cfg.quantize.calibration_images, cfg.quantize.calibration_seed)
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        to_onnx(model, images[:4], fp32)
        int8 = int8_file(fp32, calibration)
        reps = cfg.evaluate.speed_repeats
        out = {"onnx": measure(fp32, images, labels, fp32_pred, reps), "int8": measure(int8, images, labels, fp32_pred, reps)}
    return {f"{kind}_{k}": v for kind, figures in out.items() for k, v in figures.items() if k != "file"}


def timing(cfg: PipelineConfig, ws: Workspace) -> dict:
    """How the speed figures were taken, stated beside them."""
    import torch

    return {"device": str(ws.device), "torch_threads": torch.get_num_threads(), "repeats": cfg.evaluate.speed_repeats,
            "cpu": cpu_name(),
            "process": "the evaluate stage's own process, one model at a time"}


def work(run: StageRun) -> dict:
    cfg, cat = run.cfg, run.cat
    models = specs(cfg)
    ws = Workspace(cat.prepared, cfg.device, cfg.data)
    teacher = ws.load_guide(cat.model("teacher"))
    teacher_pred = None if teacher is None else predict(teacher, ws.test).argmax(1)
    quantized = int8_candidates(models) if cfg.quantize.evaluate else set()
    summary = {}
    for name, s in models.items():
        model = ws.load_guide(cat.model(name))
        if model is None:  # a teacher known only by its predictions on the training images
            result = {"test_acc": None, "note": "known only by its predictions on the training images"}
        else:
            result = evaluate(model, ws.test, ws.splits.classes, teacher_pred, cfg.evaluate.speed_repeats)
        if name in quantized:
            result |= int8_metrics(cfg, ws, cat.model(name), predict(model, ws.test).argmax(1).cpu())
        result |= {k: read_meta(cat.model(name))[k] for k in ("arch", "role", "method", "best_val_acc")}
        result |= {"seed": s.seed, "timing": timing(cfg, ws)}
        save_json(result, run.out / cat.evaluation(name).name)
        run_id = read_stage(cat.model(name))["result"].get("mlflow_run_id")
        tracking.log_test_metrics(run.ctx, run_id, {k: v for k, v in result.items() if k not in ("best_val_acc", "seed")})
        summary[name] = result["test_acc"]
    return {"test_acc": summary}
