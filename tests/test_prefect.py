import json
from pathlib import Path

import pytest
import yaml

from tasks.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def _deployments() -> list[dict]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def test_deployments_load_and_build(monkeypatch):
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.schema_tools import validate

    monkeypatch.chdir(ROOT)
    names = []
    for d in _deployments():
        assert set(d) <= {"name", "description", "entrypoint", "work_pool", "parameters", "schedules", "tags", "build"}
        assert set(d["work_pool"]) <= {"name", "job_variables"}
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        params = _deployed_parameters(d)
        dep = flow.to_deployment(name=d["name"], parameters=params, tags=d.get("tags"),
                                 work_pool_name=d["work_pool"]["name"], description=d.get("description"))
        validate(params, dep._parameter_openapi_schema.model_dump(), raise_on_error=True, ignore_required=True)
        assert dep.flow_name == ("takd-pipeline" if "pipeline" in d["entrypoint"] else f"takd-{d['name'].removesuffix('-dask')}")
        names.append(dep.name)
    assert names == ["default", "nightly", "paper", "comparison", "ta-sweep", "teacher-sweep", "student-sweep", "paths",
                     "equal-compute", "methods", "cache-views", "ta-sweep-dask"]


def _deployed_parameters(d: dict) -> dict:
    """What `prefect deploy` stores: the deployment's build steps run, their outputs templated in."""
    import asyncio

    from prefect.deployments.steps.core import run_steps
    from prefect.utilities.templating import apply_values

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    outputs = asyncio.run(run_steps(d.get("build", spec.get("build")) or [], {}, print_function=lambda *a: None))
    return apply_values(d.get("parameters", {}), outputs)


@pytest.mark.parametrize("name,profile", [("default", "params.yaml"), ("nightly", "params.yaml"),
                                          ("paper", "profiles/paper.yaml"), ("comparison", "params.yaml")])
def test_a_deployment_runs_the_profile_it_names(name, profile, monkeypatch):
    """prefect.yaml names each deployment's profile, never copies it; `prefect deploy` resolves it, so the
    parameters Prefect hands the flow (and the run form shows) are the profile's whole config."""
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    d = next(d for d in _deployments() if d["name"] == name)
    assert "{{" in str(d["parameters"])  # named through a build step, not spelled out
    flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
    config = flow.validate_parameters(_deployed_parameters(d))["config"]
    assert config.model_dump(exclude={"profile"}) == load_config(ROOT / profile).model_dump(exclude={"profile"})
    assert config.profile == (None if profile == "params.yaml" else "paper")


def test_flow_parameters_are_the_config_schema():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import takd_pipeline

    schema = parameter_schema(takd_pipeline).model_dump()
    assert {"config", "workers"} <= set(schema["properties"])
    defs = schema["definitions"]
    assert {"PipelineConfig", "TrainConfig", "KDConfig", "DataConfig"} <= set(defs)
    assert defs["KDConfig"]["properties"]["lam"]["maximum"] == 1
    assert "profile" in defs["PipelineConfig"]["properties"]


def test_the_gpu_tag_goes_only_on_stages_that_run_on_a_gpu(monkeypatch):
    import flows.pipeline as fp
    from tasks.stages import instances

    cfg = PipelineConfig(device="cpu")
    assert not any(fp.tags(i, cfg) for i in instances(cfg))
    monkeypatch.setattr(fp, "resolve_device", lambda name: __import__("torch").device("cuda"))
    from tasks.stages import STAGES

    tagged = {i.stage.name for i in instances(cfg) if fp.tags(i, cfg) == [fp.GPU_TAG]}
    assert tagged == {s for s in STAGES if STAGES[s].accelerator}
    assert "prepare-data" not in tagged and "report" not in tagged and "train-teacher" in tagged


def _kill_the_training_once(path: Path, timeout: float = 120.0) -> list[int]:
    """When `path` appears, kill -9 every process the fork server launched (tasks/launch.py); the pids killed."""
    import os
    import threading
    import time

    import psutil

    killed: list[int] = []

    def watch() -> None:
        end = time.time() + timeout
        while not path.exists() and time.time() < end:
            time.sleep(0.01)
        servers = [c for c in psutil.Process(os.getpid()).children() if "forkserver" in " ".join(c.cmdline())]
        for child in (c for server in servers for c in server.children()):
            child.kill()
            killed.append(child.pid)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_killed_stage_is_retried_by_the_flow_and_resumes_from_its_last_epoch(project, prefect_server, monkeypatch,
                                                                               tmp_path_factory):
    """kill -9 of a stage's own process in the middle of its training: its task fails, Prefect retries it, the new
    process resumes from the last epoch checkpoint, and the model is the one an uninterrupted run makes."""
    import asyncio

    import torch
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.pipeline import nodes
    from flows.runners import run_graph
    from tasks.catalog import Catalog
    from tasks.launch import config_file
    from tasks.run_context import RunContext
    from tasks.stages import run_stage as run_direct

    cfg, cat = project
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
        "arch": "plain-10", "train": cfg.teacher.train.model_copy(update={"epochs": 4})})})
    monkeypatch.chdir(cat.root)
    ctx = RunContext.resolve(cat.root)
    wanted = {k: v for k, v in nodes(cfg, cat, ctx, str(config_file(cfg, cat, "t")), False).items()
              if k in ("prepare-data", "train-teacher")}
    killed = _kill_the_training_once(cat.work("teacher") / "last.pt")

    @flow
    def two_stages():
        return run_graph(wanted, ctx, 1)

    state = two_stages(return_state=True)
    assert state.is_completed() and len(killed) == 1
    history = json.loads((cat.model("teacher") / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]

    async def run_count() -> int:
        async with get_client() as client:
            runs = await client.read_task_runs()
        return next(r.run_count for r in runs if r.flow_run_id == state.state_details.flow_run_id
                    and r.name == "train teacher plain-10 from labels (teacher)")

    assert asyncio.run(run_count()) == 2
    clean = Catalog(tmp_path_factory.mktemp("clean"))
    run_direct("prepare-data", cfg, clean)
    run_direct("train-teacher", cfg, clean)
    a = torch.load(cat.model("teacher") / "model.pt", weights_only=True)
    b = torch.load(clean.model("teacher") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_flow_is_a_dag_nokd_students_train_while_the_teacher_trains(project, prefect_server, monkeypatch):
    """Read from Prefect's API: each NOKD student's task run overlaps the teacher's, every task run starts only
    after the task runs it needs have ended, and no task needed a retry; each training ran in its own process."""
    import asyncio

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    import os

    from flows.pipeline import takd_pipeline
    from tasks.stages import instances, specs, upstream

    cfg, cat = project
    cfg = cfg.model_copy(update={"device": "cpu"})
    monkeypatch.setenv("KD_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cat.root / 'mlflow.db'}")
    monkeypatch.delenv("KD_MLFLOW_PARENT_RUN", raising=False)
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
        "arch": "plain-8", "train": cfg.teacher.train.model_copy(update={"epochs": 3})}),
        "tracking": cfg.tracking.model_copy(update={"log_models": False})})
    state = takd_pipeline(cfg, workers=4, return_state=True)
    assert state.is_completed()

    async def task_runs():
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            only = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            return await client.read_task_runs(flow_run_filter=only)

    runs = {r.name: r for r in asyncio.run(task_runs())}
    by_id = {i.id: runs[i.title(cfg)] for i in instances(cfg)}
    teacher = by_id["train-teacher"]
    for seed in cfg.student.seeds:
        nokd = by_id[f"train-student-nokd@{seed}"]
        assert nokd.start_time < teacher.end_time and teacher.start_time < nokd.end_time
    for inst in instances(cfg):
        for up in upstream(inst, cfg):
            assert by_id[up.id].end_time <= by_id[inst.id].start_time, (up.id, inst.id)
    assert not any(r.tags for r in runs.values())  # device cpu: no stage holds the gpu concurrency slot
    assert [r.name for r in runs.values() if r.run_count != 1] == []
    pids = {json.loads((cat.model(name) / "model.json").read_text())["pid"] for name in specs(cfg)}
    assert len(pids) == len(specs(cfg)) and os.getpid() not in pids
    client = MlflowClient(f"sqlite:///{cat.root / 'mlflow.db'}")
    statuses = [r.info.status for r in client.search_runs([client.get_experiment_by_name("takd").experiment_id])]
    assert statuses.count("FINISHED") == len(statuses) == 13  # twelve models (two seeds) and the parent
