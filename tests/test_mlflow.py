"""Against a temporary SQLite store: the runs, metrics, models and registry entries exist."""
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
    batch = np.random.default_rng(0).normal(size=(2, 1, 28, 28)).astype(np.float32)
    assert model.predict(batch).shape == (2, 10) and int(version.version) == 1


def test_tracking_uri_is_not_logged(tracked):
    from mlflow import MlflowClient

    _, _, uri = tracked
    client = MlflowClient(uri)
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        values = list(run.data.params.values()) + list(run.data.tags.values())
        assert not any("sqlite:" in str(v) for v in values)
