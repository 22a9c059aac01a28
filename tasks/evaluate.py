"""Stage evaluate: every trained model on the test split, which nothing else ever reads."""
from __future__ import annotations

from pathlib import Path

from engine.atomic import save_json
from engine.evaluate import evaluate
from engine.trainer import predict
from tasks import tracking
from tasks.catalog import MODELS, Catalog
from tasks.config import PipelineConfig
from tasks.context import Workspace, read_meta
from tasks.stage import read_stage, run_once, stage_key


def evaluate_models(cfg: PipelineConfig, cat: Catalog, force: bool = False) -> dict:
    inputs = {name: stage_key(cat.model(name), name) for name in MODELS}
    inputs |= {"data": stage_key(cat.prepared, "the prepared data set"), "evaluate": cfg.evaluate.model_dump()}

    def work(key: str, out: Path) -> dict:
        ws = Workspace(cat, cfg.device)
        teacher_pred = predict(ws.load_model("teacher"), ws.test).argmax(1)
        summary = {}
        for name in MODELS:
            model = ws.load_model(name)
            result = evaluate(model, ws.test, ws.splits.classes, teacher_pred, cfg.evaluate.speed_repeats)
            result |= {k: read_meta(cat.model(name))[k] for k in ("arch", "role", "method", "best_val_acc")}
            save_json(result, out / cat.evaluation(name).name)
            run_id = read_stage(cat.model(name))["result"].get("mlflow_run_id")
            tracking.log_test_metrics(cat, run_id, {k: v for k, v in result.items() if k != "best_val_acc"})
            summary[name] = result["test_acc"]
        return {"test_acc": summary}

    return run_once(cat, "evaluate", "evaluate", cat.eval_dir, inputs, work, force)
