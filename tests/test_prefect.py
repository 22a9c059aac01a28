from pathlib import Path

import yaml

from tasks.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_deployments_load_and_build():
    from prefect.client.schemas.schedules import construct_schedule  # noqa: F401
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.schema_tools import validate

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = []
    for d in spec["deployments"]:
        assert set(d) <= {"name", "description", "entrypoint", "work_pool", "parameters", "schedules", "tags"}
        assert set(d["work_pool"]) <= {"name", "job_variables"}
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        dep = flow.to_deployment(name=d["name"], parameters=d.get("parameters", {}), tags=d.get("tags"),
                                 work_pool_name=d["work_pool"]["name"], description=d.get("description"))
        validate(d.get("parameters", {}), dep._parameter_openapi_schema.model_dump(), raise_on_error=True,
                 ignore_required=True)
        if "config" in d.get("parameters", {}):
            PipelineConfig.model_validate(d["parameters"]["config"])
        assert dep.flow_name == ("takd-pipeline" if "pipeline" in d["entrypoint"] else f"takd-{d['name'].removesuffix('-dask')}")
        names.append(dep.name)
    assert names == ["default", "nightly", "paper", "comparison", "ta-sweep", "teacher-sweep", "student-sweep", "paths",
                     "equal-compute", "methods", "ta-sweep-dask"]


def test_flow_parameters_are_the_config_schema():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import takd_pipeline

    schema = parameter_schema(takd_pipeline).model_dump()
    assert "config" in schema["properties"]
    defs = schema["definitions"]
    assert {"PipelineConfig", "TrainConfig", "KDConfig", "DataConfig"} <= set(defs)
    assert defs["KDConfig"]["properties"]["lam"]["maximum"] == 1


def test_failed_stage_retries_and_resumes_from_its_last_epoch(project, prefect_server, monkeypatch, tmp_path_factory):
    import torch

    import tasks.train_model as tm
    from flows.pipeline import run_stage
    from tasks.catalog import Catalog

    cfg, cat = project
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
        "train": cfg.teacher.train.model_copy(update={"epochs": 2})})})
    real_fit, calls = tm.fit, []

    def flaky_fit(*args, **kw):
        calls.append(kw["callback"])
        if len(calls) == 1:
            def crash(metrics, _cb=kw["callback"]):
                _cb(metrics)
                raise RuntimeError("GPU fell off the bus")
            kw["callback"] = crash
        return real_fit(*args, **kw)

    monkeypatch.setattr(tm, "fit", flaky_fit)
    from prefect import flow

    @flow
    def two_stages():
        run_stage.with_options(retry_delay_seconds=0)("prepare-data", cfg)
        return run_stage.with_options(retry_delay_seconds=0)("train-teacher", cfg)

    two_stages()
    assert len(calls) == 2
    history = (cat.model("teacher") / "history.json").read_text()
    assert '"epoch": 1' in history and '"epoch": 2' in history

    monkeypatch.setattr(tm, "fit", real_fit)
    clean = Catalog(tmp_path_factory.mktemp("clean"))
    tm.train_model(cfg, clean, "teacher") if (clean.prepared).exists() else None
    from tasks.prepare_data import prepare_data

    prepare_data(cfg, clean)
    tm.train_model(cfg, clean, "teacher")
    a = torch.load(cat.model("teacher") / "model.pt", weights_only=True)
    b = torch.load(clean.model("teacher") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
