"""Stage evaluate: every trained model on the test split, which nothing else ever reads."""
from __future__ import annotations

from engine.atomic import save_json
from engine.evaluate import evaluate
from engine.trainer import predict
from tasks import tracking
from tasks.context import Workspace, read_meta
from tasks.stage import StageRun, read_stage
from tasks.train_model import PipelineModel


def work(run: StageRun, models: dict[str, PipelineModel]) -> dict:
    cfg, cat = run.cfg, run.cat
    ws = Workspace(cat, cfg.device)
    teacher_pred = predict(ws.load_model("teacher"), ws.test).argmax(1)
    summary = {}
    for name, m in models.items():
        result = evaluate(ws.load_model(name), ws.test, ws.splits.classes, teacher_pred, cfg.evaluate.speed_repeats)
        result |= {k: read_meta(cat.model(name))[k] for k in ("arch", "role", "method", "best_val_acc")}
        result["seed"] = m.seed
        save_json(result, run.out / cat.evaluation(name).name)
        run_id = read_stage(cat.model(name))["result"].get("mlflow_run_id")
        tracking.log_test_metrics(cat, run_id, {k: v for k, v in result.items() if k not in ("best_val_acc", "seed")})
        summary[name] = result["test_acc"]
    return {"test_acc": summary}
