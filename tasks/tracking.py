"""MLflow: one parent run per pipeline invocation, one child run per trained model.

The store defaults to SQLite in the project (mlflow.db); MLFLOW_TRACKING_URI overrides it.
A pipeline started by Prefect or the CLI sets the parent in KD_MLFLOW_PARENT_RUN. Stages
run alone (each `dvc repro` stage is its own process) share the parent recorded in
.kd/parent_run-<experiment>.json, which the report stage closes. KD_TRACKING=0 turns tracking off.
The tracking URI is never logged: it may carry credentials.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
from contextlib import contextmanager
from typing import Iterator

from engine.atomic import save_json
from models.registry import TRACE_LOCK
from tasks.catalog import Catalog
from tasks.config import PipelineConfig

ENV_PARENT, ENV_FLOW_RUN = "KD_MLFLOW_PARENT_RUN", "KD_PREFECT_FLOW_RUN_ID"
log = logging.getLogger("kd")


def enabled() -> bool:
    return os.environ.get("KD_TRACKING", "1") != "0"


# mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; the stores we chose ourselves must
# not then pass for the user's choice (a second project root in one process would log to the first).
_OURS: set[str] = set()


def use_store(uri: str):
    """Point mlflow (and its fluent API) at a store this process chose, not the user."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    _OURS.add(uri)
    return mlflow


def _users_store() -> str | None:
    users = os.environ.get("MLFLOW_TRACKING_URI")
    return users if users and users not in _OURS else None


def store_uri(cat: Catalog) -> str:
    """The user's MLFLOW_TRACKING_URI, else the project's own SQLite store."""
    return _users_store() or f"sqlite:///{cat.root / 'mlflow.db'}"


def _client(cat: Catalog):
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    if users := _users_store():
        import mlflow

        mlflow.set_tracking_uri(users)
        return mlflow, mlflow.MlflowClient(users)
    uri = store_uri(cat)
    mlflow = use_store(uri)
    return mlflow, mlflow.MlflowClient(uri)


def connect(cat: Catalog):
    """Point mlflow at the project's store (or the user's MLFLOW_TRACKING_URI) for reading."""
    return _client(cat)[0]


# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is model training.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(cfg: PipelineConfig, cat: Catalog) -> str:
    mlflow, client = _client(cat)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=(cat.root / "mlartifacts").as_uri(),
                                        tags={KIND_TAG: KIND})
    if exp.tags.get(KIND_TAG) != KIND:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def runs_pages(cfg: PipelineConfig, cat: Catalog) -> dict[str, str]:
    """The UI's runs page of the pipeline's experiment and of the experiments', in model-training mode: MLflow 3's
    UI otherwise opens an experiment on its GenAI overview, whatever the experiment's kind tag says."""
    _, client = _client(cat)
    pages = {}
    for name in (cfg.tracking.experiment, for_experiments(cfg).tracking.experiment):
        if exp := client.get_experiment_by_name(name):
            pages[name] = f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    return pages


def git_revision(cat: Catalog) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cat.root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _common_tags(cat: Catalog) -> dict[str, str]:
    tags = {}
    if rev := git_revision(cat):
        tags["mlflow.source.git.commit"] = rev
    if flow_run := os.environ.get(ENV_FLOW_RUN):
        tags["prefect_flow_run_id"] = flow_run
    return tags


def for_experiments(cfg: PipelineConfig) -> PipelineConfig:
    """The experiments log into their own MLflow experiment (`<tracking.experiment>-experiments`), so that
    grouping the pipeline's runs by method in the UI aggregates the pipeline's students only."""
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"experiment": f"{cfg.tracking.experiment}-experiments"})})


def pipeline_name(cfg: PipelineConfig) -> str:
    return f"pipeline {cfg.data.name}: {cfg.teacher.arch} -> {cfg.assistant.arch} -> {cfg.student.arch}"


def _create_parent(cfg: PipelineConfig, cat: Catalog, source: str, run_name: str | None = None,
                   kind: str = "pipeline") -> str:
    _, client = _client(cat)
    run = client.create_run(experiment_id(cfg, cat), run_name=run_name or pipeline_name(cfg),
                            tags={"source": source, "kind": kind, **_common_tags(cat)})
    client.log_dict(run.info.run_id, cfg.model_dump(mode="json"), "config.json")
    return run.info.run_id


def start_parent(cfg: PipelineConfig, cat: Catalog, source: str, run_name: str | None = None,
                 kind: str = "pipeline") -> str | None:
    """The parent run of a whole invocation (a Prefect flow, `takd pipeline`, an experiment)."""
    if not enabled():
        return None
    os.environ[ENV_PARENT] = _create_parent(cfg, cat, source, run_name, kind)
    return os.environ[ENV_PARENT]


def _parent_file(cfg: PipelineConfig, cat: Catalog):
    """Where stages run one process at a time find their shared parent: one per MLflow experiment."""
    return cat.state / f"parent_run-{cfg.tracking.experiment}.json"


def parent_id(cfg: PipelineConfig, cat: Catalog) -> str | None:
    if not enabled():
        return None
    if os.environ.get(ENV_PARENT):
        return os.environ[ENV_PARENT]
    path = _parent_file(cfg, cat)
    if path.exists():
        run_id = json.loads(path.read_text())["run_id"]
        _, client = _client(cat)
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                return run_id
        except Exception:  # the store changed (MLFLOW_TRACKING_URI): start afresh
            pass
    run_id = _create_parent(cfg, cat, "dvc" if os.environ.get("DVC_ROOT") or os.environ.get("DVC_STAGE") else "cli")
    save_json({"run_id": run_id}, path)  # stages in later processes join it until report closes it
    return run_id


def end_parent(cat: Catalog, status: str = "FINISHED") -> None:
    """Close the flow's parent run (from the env)."""
    run_id = os.environ.pop(ENV_PARENT, None)
    if run_id and enabled():
        _client(cat)[1].set_terminated(run_id, status)


class ModelRun:
    """Logs one trained model: params, per-epoch metrics with step, the model itself."""

    def __init__(self, mlflow, client, run_id: str | None, log_models: bool = False):
        self.mlflow, self.client, self.run_id, self.log_models = mlflow, client, run_id, log_models

    def log_epoch(self, metrics: dict) -> None:
        if self.run_id:
            step = int(metrics["epoch"])
            self.client.log_batch(self.run_id, metrics=[_metric(k, v, step) for k, v in metrics.items() if k != "epoch"])

    def log_model(self, model, ws, meta: dict) -> None:
        if not self.run_id:
            return
        import numpy as np

        keep = ("params", "size_bytes", "flops", "best_val_acc", "best_epoch")
        self.client.log_batch(self.run_id, metrics=[_metric(k, meta[k]) for k in keep if meta.get(k) is not None])
        self.client.log_dict(self.run_id, meta, "model.json")
        if not self.log_models:
            return
        if model is None:
            self.client.set_tag(self.run_id, "model_logged", "no: a teacher known only by its predictions")
            return
        if getattr(model, "arch", "") == "torchscript":  # torch.export cannot trace a ScriptModule
            self.client.set_tag(self.run_id, "model_logged", "no: an imported TorchScript teacher")
            return
        from engine.export import Deployable

        # As shipped (engine.export): images in [0, 1], normalised inside, so pyfunc callers and
        # `mlflow models serve` need no statistics. pt2 export bakes the eval mode into the graph.
        example = (ws.val.x[:4].float() / 255).cpu().numpy().astype(np.float32)
        with TRACE_LOCK, self.mlflow.start_run(run_id=self.run_id):
            info = self.mlflow.pytorch.log_model(Deployable(model, ws.mean, ws.std), name="model",
                                                 input_example=example, pip_requirements=["torch", "torchvision"])
        self.client.set_tag(self.run_id, "model_uri", info.model_uri)


def _metric(key: str, value, step: int = 0):
    import time

    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


@contextmanager
def model_run(cfg: PipelineConfig, cat: Catalog, name: str, run_name: str, role: str, method: str,
              params: dict) -> Iterator[ModelRun]:
    if not enabled():
        yield ModelRun(None, None, None)
        return
    mlflow, client = _client(cat)
    parent = parent_id(cfg, cat)
    tags = {"role": role, "method": method, "model": name, "seed": str(params.get("seed", "")),
            "mlflow.parentRunId": parent, **_common_tags(cat)}
    run = client.create_run(experiment_id(cfg, cat), run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
    handle = ModelRun(mlflow, client, run.info.run_id, cfg.tracking.log_models)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def _param(key: str, value):
    from mlflow.entities import Param

    return Param(key, str(value))


def log_test_metrics(cat: Catalog, run_id: str | None, metrics: dict) -> None:
    """Final test metrics on a model's own child run (it may come from an earlier invocation)."""
    if not (enabled() and run_id):
        return
    _, client = _client(cat)
    try:
        client.log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items() if isinstance(v, (int, float))])
    except Exception as e:  # the run lives in another store (MLFLOW_TRACKING_URI changed)
        log.warning("could not log test metrics to MLflow run %s: %s", run_id, type(e).__name__)


def register(cat: Catalog, run_id: str, name: str, alias: str) -> dict | None:
    """Register the run's model under `alias`, unless the alias already points at that run's model."""
    mlflow, client = _client(cat)
    try:
        current = client.get_model_version_by_alias(name, alias)
        if current.run_id == run_id:
            return {"name": name, "version": current.version, "alias": alias}
    except mlflow.exceptions.MlflowException:  # no such model or alias yet
        pass
    try:
        uri = client.get_run(run_id).data.tags["model_uri"]
    except (mlflow.exceptions.MlflowException, KeyError) as e:  # the run lives in another store, or has no model
        log.warning("could not register the model of MLflow run %s: %s", run_id, type(e).__name__)
        return None
    version = mlflow.register_model(uri, name)
    client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": version.version, "alias": alias}


def log_report(cfg: PipelineConfig, cat: Catalog, metrics: dict, files: list) -> None:
    if not enabled():
        return
    _, client = _client(cat)
    run_id = parent_id(cfg, cat)
    flat = [_metric(f"{model}_{k}", v) for model, vals in metrics.items() for k, v in vals.items()
            if isinstance(v, (int, float))]
    client.log_batch(run_id, metrics=flat)
    client.log_dict(run_id, metrics, "metrics.json")
    for f in files:
        client.log_artifact(run_id, str(f))


def end_file_parent(cfg: PipelineConfig, cat: Catalog) -> None:
    """Close the parent that stages opened on their own (DVC, single CLI stages); a flow closes its own."""
    path = _parent_file(cfg, cat)
    if not os.environ.get(ENV_PARENT) and path.exists():
        run_id = json.loads(path.read_text())["run_id"]
        path.unlink()
        if enabled():
            _client(cat)[1].set_terminated(run_id, "FINISHED")
