"""The experiments as Prefect flows, one per plan (experiments/plans.py), all made by `experiment_flow`.

A flow's tasks are the experiment's steps: its prepared data, each training and each guide's soft targets, and
the report. Each runs its command in a process of its own (flows/runners.py), submitted once what it reads is
done: independent trainings (the seeds, the sizes of a sweep) run at once, on threads here or on a Dask cluster
(prefect-dask) that `KD_DASK_ADDRESS` or `--dask-address` names. Trainings are seeded and write to folders named
by their content, so any runner gives the same models.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

from prefect import Flow, flow, get_run_logger
from prefect.runtime import flow_run

from engine.device import resolve_device
from experiments.plans import PLANS, Plan, build_plan
from experiments.run import TRAIN, command, done, needs, steps
from flows.runners import DEFAULT_WORKERS, GPU_TAG, WORKERS, Node, run_graph, task_runner
from tasks import tracking
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.launch import config_file
from tasks.run_context import RunContext
from tasks.stages import Instance, STAGES

PREPARE, REPORT = "prepare-data", "report"


def nodes(plan: Plan, cfg: PipelineConfig, cat: Catalog, ctx: RunContext, params: str, variant: str,
          seed: int | None) -> dict[str, Node]:
    """prepare-data, every training and cache the selected rows need, and the report when the whole plan runs."""
    tags = [GPU_TAG] if resolve_device(cfg.device).type == "cuda" else []
    out = {PREPARE: Node(PREPARE, f"prepare data {cfg.data.name}", Instance(STAGES[PREPARE]).command(params))}
    for step in steps(plan, variant, seed):
        s = step.spec
        title = s.title if step.kind == TRAIN else f"cache soft targets of {s.role} {s.arch} s{s.seed} ({step.made.views} views)"
        out[step.node] = Node(step.kind, title, command(step, plan, params), [PREPARE, *needs(step)], tags,
                              partial(done, step, cfg, cat, ctx))
    if variant == "*" and seed is None:
        out[REPORT] = Node(REPORT, f"report {plan.name}", ["experiments", REPORT, plan.name, "--params", params],
                           [n for n in out if n.startswith(f"{TRAIN}:")])
    return out


def run_experiment(name: str, config: PipelineConfig, variant: str = "*", seed: Optional[int] = None,
                   workers: int = DEFAULT_WORKERS) -> dict:
    """The body every experiment flow shares: plan, steps, then the report when the whole plan ran."""
    cat, cfg = Catalog.default(), tracking.for_experiments(config)
    plan = build_plan(name, cfg)
    ctx = RunContext.resolve(cat.root)
    parent = tracking.open_parent(ctx, cfg, "prefect", f"experiment {name} ({cfg.data.name})", "experiment")
    ctx = ctx.under(parent, str(flow_run.get_id() or "") or None)
    params = config_file(config, cat, f"flow-{ctx.flow_run or 'local'}")  # the children apply for_experiments
    try:
        results = run_graph(nodes(plan, cfg, cat, ctx, str(params), variant, seed), ctx, workers)
    except BaseException:
        tracking.close_parent(ctx, parent, "FAILED")
        raise
    finally:
        params.unlink(missing_ok=True)
    tracking.close_parent(ctx, parent)
    trained = {n.split(":", 1)[1]: r for n, r in results.items() if n.startswith(f"{TRAIN}:")}
    new = sorted(sid for sid, r in trained.items() if not r.get("reused"))
    get_run_logger().info("%s: %d trainings, %d new", name, len(trained), len(new))
    report = results.get(REPORT)
    return {"experiment": name, "trained": new, "reused": len(trained) - len(new),
            "report": str(cat.experiment(name) / "report") if report else None,
            "means": report["means"] if report else None, "contrasts": report["contrasts"] if report else None}


def experiment_flow(name: str) -> Flow:
    """The Prefect flow of one experiment. `variant` (a glob) and `seed` run part of a plan; the report is written
    when the whole plan ran."""
    def body(config: PipelineConfig = PipelineConfig(), variant: str = "*", seed: Optional[int] = None,
             workers: int = WORKERS) -> dict:
        return run_experiment(name, config, variant, seed, workers)

    body.__name__ = name.replace("-", "_")
    return flow(body, name=f"takd-{name}", log_prints=True, task_runner=task_runner(),
                description=(PLANS[name].__doc__ or f"the {name} experiment").strip().splitlines()[0])


FLOWS = {name: experiment_flow(name) for name in PLANS}
# prefect.yaml's entrypoints name them (flows/experiment.py:ta_sweep).
comparison, ta_sweep, teacher_sweep = FLOWS["comparison"], FLOWS["ta-sweep"], FLOWS["teacher-sweep"]
student_sweep, paths, equal_compute, methods = FLOWS["student-sweep"], FLOWS["paths"], FLOWS["equal-compute"], FLOWS["methods"]
cache_views = FLOWS["cache-views"]
