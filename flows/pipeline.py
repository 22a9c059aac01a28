"""The TAKD pipeline as a Prefect flow: the stage table's instances as a DAG of task runs.

Each stage instance is a task run named for what it does, which runs that stage's command, `python -m tasks
<stage>` (what `dvc repro` runs), in a process of its own (flows/runners.py); independent stages run at once,
at most `workers` of them: the NOKD students train while the teacher does. The flow only wires stages together;
the work is in tasks/. Its parameter is the pipeline config, so the Prefect UI shows the schema as a form.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from engine.device import resolve_device
from flows.dvc_sync import sync_dvc_lock
from flows.runners import GPU_TAG, WORKERS, Node, run_graph, task_runner
from tasks import tracking
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.launch import config_file
from tasks.run_context import RunContext
from tasks.stages import Instance, done, needed, upstream


def tags(inst: Instance, config: PipelineConfig) -> list[str]:
    """The `gpu` tag, whose concurrency limit keeps two stages off one GPU, on accelerator stages on a GPU only."""
    return [GPU_TAG] if inst.stage.accelerator and resolve_device(config.device).type == "cuda" else []


def nodes(config: PipelineConfig, cat: Catalog, ctx: RunContext, params: str, force: bool,
          stages: list[str] | None = None) -> dict[str, Node]:
    return {inst.id: Node(inst.stage.name, inst.title(config), inst.command(params, force),
                          [u.id for u in upstream(inst, config)], tags(inst, config),
                          None if force else partial(done, inst, config, cat, ctx))
            for inst in needed(config, stages)}


@flow(name="takd-pipeline", log_prints=True, task_runner=task_runner())
def takd_pipeline(config: PipelineConfig = PipelineConfig(), force: bool = False,
                  workers: int = WORKERS, stages: Optional[list[str]] = None) -> dict:
    """prepare-data -> teacher -> soft targets -> assistant -> soft targets -> students over the seeds
    (NOKD, BLKD, TAKD) -> fine-tune -> evaluate -> report -> export. `stages`: only these, and the stages they read
    from (as `dvc repro <stage>`); unset, all."""
    cat = Catalog.default()
    ctx = RunContext.resolve(cat.root)
    ctx = ctx.under(tracking.open_parent(ctx, config, "prefect"), str(flow_run.get_id() or "") or None)
    params = config_file(config, cat, f"flow-{ctx.flow_run or 'local'}")
    try:
        results = run_graph(nodes(config, cat, ctx, str(params), force, stages), ctx, workers)
    except BaseException:
        tracking.close_parent(ctx, ctx.parent, "FAILED")
        raise
    finally:
        params.unlink(missing_ok=True)
    tracking.close_parent(ctx, ctx.parent)
    synced = sync_dvc_lock(config, cat) if stages is None else False
    get_run_logger().info("dvc.lock %s", "updated: dvc status is clean" if synced else "left alone (not the params.yaml "
                                                                                      "config, or not every stage)")
    report, export = results.get("report", {}), results.get("export", {})
    return {"means": report.get("means"), "contrasts": report.get("contrasts"), "exported": export.get("model"),
            "reused": [i for i, r in results.items() if r.get("reused")]}
