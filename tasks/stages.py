"""The pipeline's stages by name: what the CLI, dvc.yaml and the Prefect flow all call."""
from __future__ import annotations

from typing import Callable

from tasks.cache_soft_targets import cache_soft_targets
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.evaluate import evaluate_models
from tasks.export import export_student
from tasks.prepare_data import prepare_data
from tasks.report import report
from tasks.train_model import describe, train_model

Stage = Callable[[PipelineConfig, Catalog, bool], dict]

# Stages that train a model, and the model each one trains (see catalog.MODELS).
TRAINS = {"train-teacher": "teacher", "distill-assistant": "assistant", "train-student-nokd": "student-nokd",
          "distill-student-blkd": "student-blkd", "distill-student-takd": "student-takd",
          "fine-tune-student": "student-takd-ft"}


ORDER = ["prepare-data", "train-teacher", "cache-teacher", "distill-assistant", "cache-assistant",
         "train-student-nokd", "distill-student-blkd", "distill-student-takd", "fine-tune-student", "evaluate", "report", "export"]


def _stage(name: str) -> Stage:
    if name in TRAINS:
        return lambda cfg, cat, force=False: train_model(cfg, cat, TRAINS[name], force)
    if name.startswith("cache-"):
        return lambda cfg, cat, force=False: cache_soft_targets(cfg, cat, name.removeprefix("cache-"), force)
    return {"prepare-data": prepare_data, "evaluate": evaluate_models, "report": report, "export": export_student}[name]


# In pipeline order. The names are the CLI subcommands and the dvc.yaml stage names.
STAGES: dict[str, Stage] = {name: _stage(name) for name in ORDER}


def title(cfg: PipelineConfig, stage: str) -> str:
    """What a stage does, in words, for the Prefect UI and logs."""
    if stage in TRAINS:
        return describe(cfg, TRAINS[stage])
    if stage.startswith("cache-"):
        source = stage.removeprefix("cache-")
        return f"cache soft targets of {source} {getattr(cfg, source).arch} (K={cfg.cache.views})"
    return {"prepare-data": f"prepare data {cfg.data.name}", "evaluate": "evaluate all models on the test split",
            "report": "report NOKD / BLKD / TAKD",
            "export": "export the best student (TorchScript, ONNX, model card)"}[stage]


def uses_accelerator(stage: str) -> bool:
    return stage not in ("prepare-data", "report", "export")
