"""Against a temporary SQLite store: the runs, metrics, models and registry entries exist."""
import json

import numpy as np
import pytest

from tasks.stages import STAGES

EXPECTED = {"teacher": ("teacher", "NOKD"), "assistant": ("assistant", "KD"), "student-nokd": ("student", "NOKD"),
            "student-blkd": ("student", "BLKD"), "student-takd": ("student", "TAKD"), "student-takd-ft": ("student", "FT")}


@pytest.fixture
def tracked(project, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("KD_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("KD_MLFLOW_PARENT_RUN", raising=False)
    cfg, cat = project
    for fn in STAGES.values():  # stage by stage, as `dvc repro` runs them
        fn(cfg, cat, False)
    return cfg, cat, uri


def test_runs_metrics_models_and_registry(tracked):
    import mlflow
    from mlflow import MlflowClient

    cfg, cat, uri = tracked
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.data.tags["model"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(EXPECTED)
    for name, (role, method) in EXPECTED.items():
        run = children[name]
        assert (run.data.tags["role"], run.data.tags["method"]) == (role, method)
        assert run.data.params["arch"] == getattr(cfg, role).arch and "seed" in run.data.params
        assert {"test_acc", "params", "size_bytes", "flops", "latency_ms_b1", "teacher_agreement"} <= set(run.data.metrics)
        assert run.data.tags["model_uri"].startswith("models:/")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == [1]
    assert children["student-takd"].data.params["parent_model"] == "assistant"
    assert children["student-takd"].data.params["lam"] == str(cfg.kd.lam)
    assert children["student-blkd"].data.params["teacher_mode"] == "cached"
    assert {"nokd_test_acc", "blkd_test_acc", "takd_test_acc"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.png", "comparison.md", "curves.png", "config.json"} <= artifacts

    version = client.get_model_version_by_alias(cfg.tracking.registered_model, cfg.tracking.alias)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}")
    batch = np.random.default_rng(0).uniform(size=(2, 1, 28, 28)).astype(np.float32)  # images in [0, 1]
    predicted = model.predict(batch)
    assert predicted.shape == (2, 10) and int(version.version) == 1
    # The registered model is the exported one: same student, same input, same logits.
    import torch

    exported = json.loads((cat.export / "stage.json").read_text())["result"]
    registered = json.loads((cat.reports / "stage.json").read_text())["result"]["registered"]
    assert registered["model"] == exported["model"]
    scripted = torch.jit.load(str(cat.export / "model.ts"))
    assert np.abs(scripted(torch.from_numpy(batch)).detach().numpy() - predicted).max() < 1e-4


def test_tracking_uri_is_not_logged(tracked):
    from mlflow import MlflowClient

    _, _, uri = tracked
    client = MlflowClient(uri)
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        values = list(run.data.params.values()) + list(run.data.tags.values())
        assert not any("sqlite:" in str(v) for v in values)


def test_each_project_root_keeps_its_own_store_unless_the_user_names_one(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a store we chose must not then be taken
    for the user's choice by the next project root in the same process."""
    from tasks import tracking
    from tasks.catalog import Catalog
    from tasks.config import PipelineConfig

    monkeypatch.setenv("KD_TRACKING", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KD_MLFLOW_PARENT_RUN", raising=False)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        tracking.start_parent(PipelineConfig(), Catalog(tmp_path / name), "test")
        tracking.end_parent(Catalog(tmp_path / name))
    assert (tmp_path / "a" / "mlflow.db").exists() and (tmp_path / "b" / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'users.db'}")
    (tmp_path / "c").mkdir()
    tracking.start_parent(PipelineConfig(), Catalog(tmp_path / "c"), "test")
    tracking.end_parent(Catalog(tmp_path / "c"))
    assert (tmp_path / "users.db").exists() and not (tmp_path / "c" / "mlflow.db").exists()
