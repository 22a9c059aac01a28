"""MLflow: one parent run per invocation, one child run per trained model.

The store and the parent come from the RunContext (tasks/run_context.py), never from the environment:
- a flow opens its parent and hands it to its stages;
- the stages of one `dvc repro` share the parent tagged with that repro's `dvc` process (found by a tag search,
  opened by the first stage that needs it, closed by the report);
- a stage run alone opens its own only to log a report into.
Each model's run names the data it trained on as an MLflow dataset input (context "training"): the prepared data's
name, its fingerprint as digest, the files prepare-data read as source, the split sizes as profile. A nested run
also lends it to its parent, so the Dataset column is filled on the rows the Runs page shows before any expanding.
The Runs page (MLflow 3.17) opens an invocation's child runs collapsed under its parent: the [+] before the parent's
name opens them, and the browser remembers that per experiment. MLflow has no expand-all switch and no URL parameter
for it; sorting by any column but Created lists every run flat, and Group by method lists them in their groups.
KD_TRACKING=0 turns tracking off. The store's URI is never logged: it may carry credentials.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engine.distill import Hooks
from engine.spec import TrainSpec
from engine.teacher_import import PROGRAM_FILES
from tasks.config import PipelineConfig, TrackingConfig
from tasks.run_context import RunContext

log = logging.getLogger("kd")
INVOCATION_TAG = "takd.invocation"
# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is model training.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def client(ctx: RunContext):
    from mlflow import MlflowClient

    return MlflowClient(ctx.store)


@contextmanager
def fluent(ctx: RunContext) -> Iterator:
    """mlflow's fluent API (log_model needs it) pointed at the context's store for the block, then put back as it
    was: `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, which must not outlive the block."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(ctx.store)
    try:
        yield mlflow
    finally:
        utils._tracking_uri = saved_uri
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def experiment_id(ctx: RunContext, name: str) -> str:
    mc = client(ctx)
    exp = mc.get_experiment_by_name(name)
    if exp is None:
        return mc.create_experiment(name, artifact_location=(ctx.root / "mlartifacts").as_uri(), tags={KIND_TAG: KIND})
    if exp.tags.get(KIND_TAG) != KIND:
        mc.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def runs_pages(cfg: PipelineConfig, ctx: RunContext) -> dict[str, str]:
    """The UI's runs page of the pipeline's experiment and of the experiments', in model-training mode: MLflow 3's
    UI otherwise opens an experiment on its GenAI overview, whatever the experiment's kind tag says."""
    mc, pages = client(ctx), {}
    for name in (cfg.tracking.experiment, for_experiments(cfg).tracking.experiment):
        if exp := mc.get_experiment_by_name(name):
            pages[name] = f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    return pages


def git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _tags(ctx: RunContext) -> dict[str, str]:
    tags = {}
    if rev := git_revision(ctx.root):
        tags["mlflow.source.git.commit"] = rev
    if ctx.flow_run:
        tags["prefect_flow_run_id"] = ctx.flow_run
    return tags


def for_experiments(cfg: PipelineConfig) -> PipelineConfig:
    """The experiments log into their own MLflow experiment (`<tracking.experiment>-experiments`), so that
    grouping the pipeline's runs by method in the UI aggregates the pipeline's students only."""
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"experiment": f"{cfg.tracking.experiment}-experiments"})})


def pipeline_name(cfg: PipelineConfig) -> str:
    return f"pipeline {cfg.data.name}: {cfg.teacher.arch} -> {cfg.assistant.arch} -> {cfg.student.arch}"


# ---------------------------------------------------------------- the parent run of an invocation

def open_parent(ctx: RunContext, cfg: PipelineConfig, source: str, run_name: str | None = None,
                kind: str = "pipeline", tags: dict | None = None) -> str | None:
    """A new parent run (a flow's, an experiment's, a `dvc repro`'s); None when tracking is off."""
    if not ctx.tracking:
        return None
    mc = client(ctx)
    run = mc.create_run(experiment_id(ctx, cfg.tracking.experiment), run_name=run_name or pipeline_name(cfg),
                        tags={"source": source, "kind": kind, **_tags(ctx), **(tags or {})})
    mc.log_dict(run.info.run_id, cfg.model_dump(mode="json"), "config.json")
    return run.info.run_id


def close_parent(ctx: RunContext, run_id: str | None, status: str = "FINISHED") -> None:
    if run_id and ctx.tracking:
        client(ctx).set_terminated(run_id, status)


def parent_of(ctx: RunContext, cfg: PipelineConfig) -> str | None:
    """The run this invocation's runs nest under: the one handed down, or the `dvc repro`'s, found by its tag
    (the first stage that needs it opens it, under a lock so two never do)."""
    if not ctx.tracking or ctx.parent or not ctx.invocation:
        return ctx.parent if ctx.tracking else None
    from tasks.stage import state_lock

    with state_lock(ctx.root, "mlflow-parent"):
        mc = client(ctx)
        found = mc.search_runs([experiment_id(ctx, cfg.tracking.experiment)], max_results=1,
                               filter_string=f"tags.`{INVOCATION_TAG}` = '{ctx.invocation}'")
        if found:
            return found[0].info.run_id
        return open_parent(ctx, cfg, "dvc", tags={INVOCATION_TAG: ctx.invocation})


# ---------------------------------------------------------------- the data a run trained on

def prepared_dataset(ctx: RunContext, cfg: PipelineConfig, prepared: Path):
    """The prepared data as an MLflow dataset: the prepare-data stage's result (tasks/prepare_data.py) gives its
    name, fingerprint (the digest: it changes with any image, label or split) and split sizes; the source is what
    prepare-data read (engine.data.sources), the raw files' folder or the user's CSV or image folder."""
    import numpy as np
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    from engine.data import sources
    from tasks.stage import require

    class PreparedData(MetaDataset):
        """A MetaDataset (metadata only, the data stays where it is) with a profile, which MLflow's Dataset leaves
        to its subclasses, and a tensor schema written as NumpyDataset writes its own."""

        def __init__(self, profile: dict, **kw):
            self._profile = profile
            super().__init__(**kw)

        @property
        def profile(self) -> dict:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "schema": json.dumps(self.schema.to_dict()),
                    "profile": json.dumps(self._profile)}

    result = require(prepared, "prepare-data")["result"]
    read = Path(sources(cfg.data)[0])
    source = get_dataset_source_from_json(json.dumps({"uri": str(read if read.is_absolute() else ctx.root / read)}),
                                          "local")
    image = TensorSpec(np.dtype(np.uint8), (-1, *result["input_shape"]), "image")  # as the prepared store holds it
    label = TensorSpec(np.dtype(np.int64), (-1,), "label")
    schema = TensorDatasetSchema(features=Schema([image]), targets=Schema([label]))
    profile = {**{f"{s}_images": n for s, n in result["sizes"].items()}, "classes": len(result["classes"])}
    return PreparedData(profile, source=source, name=result["name"], digest=result["fingerprint"], schema=schema)


def log_dataset(ctx: RunContext, run_ids: list[str], dataset, context: str = "training") -> None:
    """`dataset` as an input of each run (MLflow keeps one input per data set and run: logging it again is a no-op).
    A failure is a warning, never a failed training: two trainings that start together may both try to create the
    data set's record in the store, so each tries twice."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    mc = client(ctx)
    for run_id in run_ids:
        for attempt in (1, 2):
            try:
                mc.log_inputs(run_id, datasets=inputs)
                break
            except Exception as e:
                if attempt == 2:
                    log.warning("could not log data set %s to MLflow run %s: %s", dataset.name, run_id,
                                type(e).__name__)


# ---------------------------------------------------------------- one run per trained model

class ModelRun:
    """A trained model's run, opened when the training has set up (so a refused setting leaves no run behind):
    its params, per-epoch metrics with step, the model itself. Its `hooks` are what the engine calls."""

    def __init__(self, ctx: RunContext, tracking: TrackingConfig, parent: str | None, spec: TrainSpec,
                 dataset=None):
        self.ctx, self.tracking, self.parent, self.spec, self.dataset = ctx, tracking, parent, spec, dataset
        self.run_id: str | None = None

    @property
    def hooks(self) -> Hooks:
        return Hooks(start=self.start, epoch=self.epoch, saved=self.saved) if self.ctx.tracking else Hooks()

    def start(self, params: dict) -> None:
        mc, s = client(self.ctx), self.spec
        tags = {"role": s.role, "method": s.method, "model": s.name, "seed": str(s.seed), **_tags(self.ctx)}
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        run = mc.create_run(experiment_id(self.ctx, self.tracking.experiment), run_name=s.title, tags=tags)
        self.run_id = run.info.run_id
        mc.log_batch(self.run_id, params=[_param(k, v) for k, v in params.items()])
        if self.dataset is not None:
            log_dataset(self.ctx, [self.run_id, *([self.parent] if self.parent else [])], self.dataset)

    def epoch(self, metrics: dict) -> None:
        step = int(metrics["epoch"])
        client(self.ctx).log_batch(self.run_id, metrics=[_metric(k, v, step) for k, v in metrics.items()
                                                         if k != "epoch"])

    def saved(self, model, ws, meta: dict) -> None:
        mc = client(self.ctx)
        keep = ("params", "size_bytes", "flops", "best_val_acc", "best_epoch")
        mc.log_batch(self.run_id, metrics=[_metric(k, meta[k]) for k in keep if meta.get(k) is not None])
        mc.log_dict(self.run_id, meta, "model.json")
        if not self.tracking.log_models:
            return
        if model is None:
            mc.set_tag(self.run_id, "model_logged", "no: a teacher known only by its predictions")
        elif getattr(model, "arch", "") in PROGRAM_FILES:  # the user's file is the model: data/models keeps it
            mc.set_tag(self.run_id, "model_logged", f"no: an imported {model.arch} teacher")
        else:
            mc.set_tag(self.run_id, "model_uri", self._log_model(model, ws))

    def _log_model(self, model, ws) -> str:
        import numpy as np

        from engine.export import Deployable

        # As shipped (engine.export): images in [0, 1], normalised inside, so pyfunc callers and
        # `mlflow models serve` need no statistics. pt2 export bakes the eval mode into the graph.
        example = (ws.val.x[:4].float() / 255).cpu().numpy().astype(np.float32)
        with fluent(self.ctx) as mlflow, mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(Deployable(model, ws.mean, ws.std), name="model", input_example=example,
                                            pip_requirements=["torch", "torchvision"])
        return info.model_uri

    def end(self, status: str) -> None:
        if self.run_id:
            client(self.ctx).set_terminated(self.run_id, status)


@contextmanager
def model_run(ctx: RunContext, cfg: PipelineConfig, spec: TrainSpec,
              prepared: Path | None = None) -> Iterator[ModelRun]:
    """`prepared`: the prepared data the model trains on, logged as the run's dataset input."""
    dataset = prepared_dataset(ctx, cfg, prepared) if ctx.tracking and prepared is not None else None
    run = ModelRun(ctx, cfg.tracking, parent_of(ctx, cfg), spec, dataset)
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def _metric(key: str, value, step: int = 0):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


def _param(key: str, value):
    from mlflow.entities import Param

    return Param(key, str(value))


def log_test_metrics(ctx: RunContext, run_id: str | None, metrics: dict) -> None:
    """Final test metrics on a model's own run (it may come from an earlier invocation)."""
    if not (ctx.tracking and run_id):
        return
    try:
        client(ctx).log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items() if isinstance(v, (int, float))])
    except Exception as e:  # the run lives in another store (MLFLOW_TRACKING_URI changed)
        log.warning("could not log test metrics to MLflow run %s: %s", run_id, type(e).__name__)


def register(ctx: RunContext, run_id: str, name: str, alias: str) -> dict | None:
    """Register the run's model under `alias`, unless the alias already points at that run's model."""
    from mlflow.exceptions import MlflowException

    mc = client(ctx)
    try:
        current = mc.get_model_version_by_alias(name, alias)
        if current.run_id == run_id:
            return {"name": name, "version": current.version, "alias": alias}
    except MlflowException:  # no such model or alias yet
        pass
    try:
        uri = mc.get_run(run_id).data.tags["model_uri"]
    except (MlflowException, KeyError) as e:  # the run lives in another store, or has no model
        log.warning("could not register the model of MLflow run %s: %s", run_id, type(e).__name__)
        return None
    with fluent(ctx) as mlflow:
        version = mlflow.register_model(uri, name)
    mc.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": version.version, "alias": alias}


def log_report(ctx: RunContext, cfg: PipelineConfig, metrics: dict, files: list, title: str) -> None:
    """The report's numbers and files on the invocation's parent run, which a `dvc repro` or a lone run then
    closes (a flow closes its own)."""
    if not ctx.tracking:
        return
    handed_down = ctx.parent is not None
    run_id = parent_of(ctx, cfg) or open_parent(ctx, cfg, "cli", title, kind="report")
    mc = client(ctx)
    flat = [_metric(f"{model}_{k}", v) for model, vals in metrics.items() for k, v in vals.items()
            if isinstance(v, (int, float))]
    mc.log_batch(run_id, metrics=flat)
    mc.log_dict(run_id, metrics, "metrics.json")
    for f in files:
        mc.log_artifact(run_id, str(f))
    if not handed_down:
        close_parent(ctx, run_id)
