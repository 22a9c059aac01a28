"""Against a temporary SQLite store: the runs, metrics, models and registry entries exist."""
import json
import sys

import numpy as np
import pytest

from tasks.stages import instances, run_instance, specs

METHODS = {"teacher": ("teacher", "teacher"), "assistant": ("assistant", "KD"), "student-nokd": ("student", "NOKD"),
           "student-blkd": ("student", "BLKD"), "student-takd": ("student", "TAKD"), "student-takd-ft": ("student", "FT"),
           "student-takd-qad": ("student", "QAD")}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, fashion_dir):
    """One tracked pipeline, stage by stage as one `dvc repro` runs them (one invocation), shared by this module's
    tests."""
    from dataclasses import replace

    from tasks.catalog import Catalog
    from tasks.config import load_config
    from tasks.run_context import RunContext
    from tests.conftest import tiny_overrides

    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KD_PROJECT_ROOT", str(root))
        mp.setenv("KD_TRACKING", "1")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("KD_MLFLOW_PARENT_RUN", raising=False)
        cfg = load_config(None, tiny_overrides(fashion_dir, root) | {"quantize.qad_epochs": 1})  # QAD trains, is logged
        cat = Catalog(root)
        for inst in instances(cfg):  # each stage resolves its context, as each of DVC's processes does
            run_instance(inst, cfg, cat, replace(RunContext.resolve(root), invocation="dvc-repro-under-test"))
        yield cfg, cat, uri


def test_mlflow_ui_listens_on_localhost_over_our_store_and_prints_the_runs_link(tracked, monkeypatch, capsys):
    import takd.cli

    cfg, cat, uri = tracked
    started = []
    monkeypatch.setattr(takd.cli.os, "execv", lambda file, argv: started.append([file, *argv]))
    monkeypatch.chdir(cat.root)
    monkeypatch.setenv("KD_PROJECT_ROOT", str(cat.root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert takd.cli.main(["mlflow-ui", "--port", "5123"]) == 0
    (argv,) = started
    assert argv[:4] == [sys.executable, sys.executable, "-m", "mlflow"]  # this venv's, found without PATH
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--backend-store-uri") + 1] == uri
    from mlflow import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(cfg.tracking.experiment)
    link = f"http://127.0.0.1:5123/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    assert f"{cfg.tracking.experiment}: {link}" in capsys.readouterr().out


def test_runs_metrics_models_and_registry(tracked):
    import mlflow
    from mlflow import MlflowClient

    cfg, cat, uri = tracked
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs, not GenAI
    from tasks.tracking import runs_pages  # the links `takd mlflow-ui` prints: that experiment's runs, ML mode

    from tasks.run_context import RunContext

    assert runs_pages(cfg, RunContext.resolve(cat.root)) == {cfg.tracking.experiment:
                                    f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"}
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    # One invocation, one parent: found by its tag by every stage after the first, closed by the report.
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["takd.invocation"] == "dvc-repro-under-test" and parent.data.tags["source"] == "dvc"
    children = {r.data.tags["model"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(specs(cfg))
    for name, s in specs(cfg).items():
        run = children[name]
        base = name.removesuffix(f"-s{s.seed}") if s.role == "student" else name
        assert (run.data.tags["role"], run.data.tags["method"]) == METHODS[base]
        assert run.data.tags["seed"] == str(s.seed) == run.data.params["seed"]  # MLflow groups by method and seed
        assert run.data.params["arch"] == getattr(cfg, s.role).arch
        assert {"test_acc", "params", "size_bytes", "flops", "latency_ms_b1", "teacher_agreement"} <= set(run.data.metrics)
        assert run.data.tags["model_uri"].startswith("models:/")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == [1]
    assert {children[f"student-takd-s{s}"].data.tags["seed"] for s in cfg.student.seeds} == {"0", "1"}
    assert children["student-takd-s1"].data.params["parent_model"] == "assistant"
    assert children["student-takd-s1"].data.params["lam"] == str(cfg.kd.lam)
    assert children["student-blkd-s0"].data.params["teacher_mode"] == "cached"
    # The parent holds the comparison over seeds: means, spreads and the paired differences.
    assert {"nokd_test_acc_mean", "takd_test_acc_std", "takd_minus_blkd_mean", "takd_minus_blkd_low",
            "blkd_minus_nokd_high", "teacher_test_acc"} <= set(parent.data.metrics)
    nokd = [children[f"student-nokd-s{s}"].data.metrics["test_acc"] for s in cfg.student.seeds]
    assert parent.data.metrics["nokd_test_acc_mean"] == pytest.approx(np.mean(nokd))
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
    assert version.run_id == children[exported["model"]].info.run_id
    from engine.export import load_pt2

    with torch.no_grad():
        exported_logits = load_pt2(cat.export / "model.pt2")(torch.from_numpy(batch)).numpy()
    assert np.abs(exported_logits - predicted).max() < 1e-4


def test_registration_does_not_depend_on_reuse(tracked, monkeypatch):
    """With the registered model gone, a rerun that reuses every stage registers the exported student again,
    once: what is registered follows the export, not whether a stage happened to run."""
    from mlflow import MlflowClient

    cfg, cat, uri = tracked
    for key, value in (("KD_PROJECT_ROOT", str(cat.root)), ("KD_TRACKING", "1"), ("MLFLOW_TRACKING_URI", uri)):
        monkeypatch.setenv(key, value)
    client = MlflowClient(uri)
    client.delete_registered_model(cfg.tracking.registered_model)
    for _ in range(2):
        results = {i.id: run_instance(i, cfg, cat) for i in instances(cfg)}
        assert all(r["reused"] for r in results.values())
    versions = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
    exported = results["export"]["model"]
    assert len(versions) == 1 and results["export"]["registered"]["model"] == exported
    assert versions[0].run_id == json.loads((cat.model(exported) / "stage.json").read_text())["result"]["mlflow_run_id"]


def test_tracking_uri_is_not_logged(tracked):
    from mlflow import MlflowClient

    _, _, uri = tracked
    client = MlflowClient(uri)
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        values = list(run.data.params.values()) + list(run.data.tags.values())
        assert not any("sqlite:" in str(v) for v in values)


def test_each_project_root_keeps_its_own_store_unless_the_user_names_one(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: the fluent API is pointed at a context's store for a
    block only, so the next project root in the same process is not taken for the user's choice."""
    import os

    from tasks import tracking
    from tasks.config import PipelineConfig
    from tasks.run_context import RunContext

    monkeypatch.setenv("KD_TRACKING", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        ctx = RunContext.resolve(tmp_path / name)
        tracking.close_parent(ctx, tracking.open_parent(ctx, PipelineConfig(), "test"))
        with tracking.fluent(ctx) as mlflow:
            assert mlflow.get_tracking_uri() == ctx.store
        assert "MLFLOW_TRACKING_URI" not in os.environ
    assert (tmp_path / "a" / "mlflow.db").exists() and (tmp_path / "b" / "mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'users.db'}")
    (tmp_path / "c").mkdir()
    ctx = RunContext.resolve(tmp_path / "c")
    tracking.close_parent(ctx, tracking.open_parent(ctx, PipelineConfig(), "test"))
    assert (tmp_path / "users.db").exists() and not (tmp_path / "c" / "mlflow.db").exists()


def test_a_stage_run_alone_joins_no_other_invocation(tracked, monkeypatch):
    """Outside a flow and outside `dvc repro`, a training is a run of its own: it is never attached to a parent
    that another invocation opened (the report it runs would open, and close, its own)."""
    from mlflow import MlflowClient

    from tasks.run_context import RunContext
    from tasks.stages import Instance, STAGES

    cfg, cat, uri = tracked
    for key, value in (("KD_PROJECT_ROOT", str(cat.root)), ("KD_TRACKING", "1"), ("MLFLOW_TRACKING_URI", uri)):
        monkeypatch.setenv(key, value)
    run_instance(Instance(STAGES["train-student-nokd"], 0), cfg, cat, RunContext.resolve(cat.root), force=True)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    latest = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert latest.data.tags["model"] == "student-nokd-s0" and "mlflow.parentRunId" not in latest.data.tags


def _trained_on(client, run_id: str) -> dict:
    """The run's one dataset input, as MLflow gives it back: its data set and its context."""
    (given,) = client.get_run(run_id).inputs.dataset_inputs
    return {"dataset": given.dataset, "context": {t.key: t.value for t in given.tags}.get("mlflow.data.context")}


def test_each_training_names_its_data_set_and_version(tracked, tmp_path, monkeypatch):
    """Every model's run, and the pipeline run it nests under, holds the prepared data as an MLflow dataset input
    (the Runs page's Dataset column): its name, its fingerprint as digest, where it came from, its split sizes,
    context training. Other images make another digest."""
    from mlflow import MlflowClient

    from tasks import tracking
    from tasks.catalog import Catalog
    from tasks.config import load_config
    from tasks.run_context import RunContext
    from tasks.stages import Instance, STAGES
    from tests.conftest import tiny_overrides
    from tests.fakes import write_fashion

    cfg, cat, uri = tracked
    client = MlflowClient(uri)
    prepared = json.loads((cat.prepared / "stage.json").read_text())["result"]
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    trained = [r for r in runs if "model" in r.data.tags]
    parent = next(r for r in runs if r.data.tags.get("kind") == "pipeline")
    assert {r.data.tags["model"] for r in trained} >= set(specs(cfg))
    for run in [*trained, parent]:
        got = _trained_on(client, run.info.run_id)
        assert got["context"] == "training"
        ds = got["dataset"]
        assert (ds.name, ds.digest) == ("fashion-mnist", prepared["fingerprint"])
        assert ds.source_type == "local"
        assert json.loads(ds.source)["uri"] == str(cat.root / "raw" / "FashionMNIST" / "raw")  # what prepare-data read
        sizes = prepared["sizes"]
        assert json.loads(ds.profile) == {"train_images": sizes["train"], "val_images": sizes["val"],
                                          "test_images": sizes["test"], "classes": 10}
        spec = {k: json.loads(v) if v else [] for k, v in json.loads(ds.schema)["mlflow_tensorspec"].items()}
        assert [(c["name"], c["tensor-spec"]) for c in spec["features"] + spec["targets"]] == [
            ("image", {"dtype": "uint8", "shape": [-1, *prepared["input_shape"]]}),  # as the prepared store holds them
            ("label", {"dtype": "int64", "shape": [-1]})]

    # data.root relative, as params.yaml has it: the source is still the absolute folder, under the project root.
    relative = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": "raw"})})
    source = tracking.prepared_dataset(RunContext.resolve(cat.root), relative, cat.prepared).source
    assert source.to_dict()["uri"] == str(cat.root / "raw" / "FashionMNIST" / "raw")

    # Other images: another fingerprint, another digest, on a model trained on them.
    root = tmp_path / "other"
    other_uri = f"sqlite:///{tmp_path}/other.db"
    for key, value in (("KD_PROJECT_ROOT", str(root)), ("KD_TRACKING", "1"), ("MLFLOW_TRACKING_URI", other_uri)):
        monkeypatch.setenv(key, value)
    other_cfg = load_config(None, tiny_overrides(write_fashion(tmp_path / "fashion2", n_train=300), root))
    other_cat = Catalog(root)
    ctx = RunContext.resolve(root)
    run_instance(Instance(STAGES["prepare-data"]), other_cfg, other_cat, ctx)
    result = run_instance(Instance(STAGES["train-student-nokd"], 0), other_cfg, other_cat, ctx)
    fingerprint = json.loads((other_cat.prepared / "stage.json").read_text())["result"]["fingerprint"]
    got = _trained_on(MlflowClient(other_uri), result["mlflow_run_id"])
    assert fingerprint != prepared["fingerprint"]
    assert (got["dataset"].name, got["dataset"].digest, got["context"]) == ("fashion-mnist", fingerprint, "training")
