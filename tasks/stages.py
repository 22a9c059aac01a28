"""The pipeline's stages by name: what the CLI, dvc.yaml and the Prefect flow all call."""
from __future__ import annotations

from typing import Callable

from tasks.cache_soft_targets import cache_soft_targets
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.evaluate import evaluate_models
from tasks.prepare_data import prepare_data
from tasks.report import report
from tasks.train_model import train_model

Stage = Callable[[PipelineConfig, Catalog, bool], dict]

# In pipeline order. The names are the CLI subcommands and the dvc.yaml stage names.
STAGES: dict[str, Stage] = {
    "prepare-data": prepare_data,
    "train-teacher": lambda cfg, cat, force=False: train_model(cfg, cat, "teacher", force),
    "cache-teacher": lambda cfg, cat, force=False: cache_soft_targets(cfg, cat, "teacher", force),
    "distill-assistant": lambda cfg, cat, force=False: train_model(cfg, cat, "assistant", force),
    "cache-assistant": lambda cfg, cat, force=False: cache_soft_targets(cfg, cat, "assistant", force),
    "train-student-nokd": lambda cfg, cat, force=False: train_model(cfg, cat, "student-nokd", force),
    "distill-student-blkd": lambda cfg, cat, force=False: train_model(cfg, cat, "student-blkd", force),
    "distill-student-takd": lambda cfg, cat, force=False: train_model(cfg, cat, "student-takd", force),
    "fine-tune-student": lambda cfg, cat, force=False: train_model(cfg, cat, "student-takd-ft", force),
    "evaluate": evaluate_models,
    "report": report,
}


def title(cfg: PipelineConfig, stage: str) -> str:
    """What a stage does, in words, for the Prefect UI and logs."""
    from tasks.train_model import describe

    models = {"train-teacher": "teacher", "distill-assistant": "assistant", "train-student-nokd": "student-nokd",
              "distill-student-blkd": "student-blkd", "distill-student-takd": "student-takd",
              "fine-tune-student": "student-takd-ft"}
    if stage in models:
        return describe(cfg, models[stage])
    if stage.startswith("cache-"):
        source = stage.removeprefix("cache-")
        return f"cache soft targets of {source} {getattr(cfg, source).arch} (K={cfg.cache.views})"
    return {"prepare-data": f"prepare data {cfg.data.name}", "evaluate": "evaluate all models on the test split",
            "report": "report NOKD / BLKD / TAKD"}[stage]


def uses_accelerator(stage: str) -> bool:
    return stage not in ("prepare-data", "report")
