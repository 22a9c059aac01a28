"""`takd`: every stage of the pipeline, the pipeline as a Prefect flow, and the experiments.

  takd <stage> | params | stages | fetch-data | predict   as `python -m tasks` (tasks/cli.py)
  takd dvc-yaml [--check]                      dvc.yaml and experiments/dvc.yaml, from the tables and params.yaml
  takd pipeline [--stages S ...] [--workers N | --dask-workers N | --dask-address tcp://...]
  takd experiments list | run NAME | job NAME | report NAME
  takd mlflow-ui [--port 5000]                 the MLflow UI on 127.0.0.1, and the links to its runs pages

Every field of the config schema is a flag (`--student.arch plain-4`); `--profile paper` starts
from a profile. Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from experiments import cli as experiments_cli
from flows.workers import DEFAULT_WORKERS
from tasks import cli as tasks_cli

# Light on purpose: `takd --help` imports neither torch nor Prefect nor MLflow (nor pydantic): the flows, the plans
# and the config schema are imported when a command needs them, and each subcommand's arguments are added only when it
# is the one being parsed (tasks.cli.LazySubParsers).


def _runner_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="stages or trainings that work at once "
                                                                        "(default: KD_WORKERS or 2)")
    p.add_argument("--dask-workers", type=int, default=0, help="start a local Dask cluster of N processes")
    p.add_argument("--dask-address", default=None, help="join this Dask scheduler, e.g. tcp://10.0.0.5:8786")


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="redo every stage even if its outputs are up to date")
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help="only these stages and those they read from (as `dvc repro STAGE`)")
    _runner_flags(p)
    tasks_cli.add_params_flags(p)


def _mlflow_ui_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=5000)
    # The store comes from the run context (MLFLOW_TRACKING_URI, else the project's); of the config, only the
    # names of the pipeline's and the experiments' MLflow experiments (tracking.experiment) are read, for the
    # links: from params.yaml or --params, so the config's field flags are left off here.
    tasks_cli.add_params_file(p)


def _experiment_run_args(p: argparse.ArgumentParser) -> None:
    experiments_cli.add_plan_args(p, selection=True)
    _runner_flags(p)
    tasks_cli.add_params_flags(p)


def _experiments_commands(exp: argparse.ArgumentParser) -> None:
    exp_sub = tasks_cli.subcommands(exp, "experiments_command")
    experiments_cli.add_commands(exp_sub)
    exp_sub.add_parser("run", fill=_experiment_run_args, help="run an experiment as a Prefect flow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="takd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = tasks_cli.subcommands(parser, "command")
    tasks_cli.add_commands(sub)
    sub.add_parser("pipeline", fill=_pipeline_args, help="run every stage through the Prefect flow",
                   description="run every stage through the Prefect flow: independent stages at once, finished ones "
                               "reused")
    sub.add_parser("mlflow-ui", fill=_mlflow_ui_args,
                   help="start the MLflow UI on 127.0.0.1 and print the links to the runs",
                   description="start `mlflow ui` on 127.0.0.1 over the project's store, after printing the links "
                               "that open the pipeline's and the experiments' runs (not the GenAI overview)")
    sub.add_parser("experiments", fill=_experiments_commands, help="the experiments over seeds (list, run, job, report)")
    return parser


def _runner(args: argparse.Namespace):
    from flows.runners import task_runner

    return task_runner(args.dask_address, args.dask_workers)


def _pipeline(args: argparse.Namespace):
    from flows.pipeline import takd_pipeline

    return takd_pipeline.with_options(task_runner=_runner(args))(tasks_cli.config_from(args), force=args.force,
                                                                 workers=args.workers, stages=args.stages)


def _experiment(args: argparse.Namespace):
    cfg = tasks_cli.config_from(args)
    experiments_cli.selected_plan(args, cfg)
    from flows.experiment import FLOWS

    return FLOWS[args.name].with_options(task_runner=_runner(args))(cfg, args.variant, args.seed, args.workers)


def _mlflow_ui(args: argparse.Namespace) -> None:
    from tasks import tracking
    from tasks.run_context import RunContext

    ctx = RunContext.resolve()
    pages = tracking.runs_pages(tasks_cli.config_from(args), ctx)
    for name, page in pages.items():
        print(f"{name}: http://127.0.0.1:{args.port}/{page}", flush=True)
    if not pages:
        print("no runs yet: run the pipeline first (./run.sh pipeline)", flush=True)
    # This interpreter's mlflow, not the first on PATH: `.venv/bin/takd` works without an activated venv.
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(args.port),
                              "--backend-store-uri", ctx.store])


def main(argv: list[str] | None = None) -> int:
    tasks_cli.prepare_process()
    args = build_parser().parse_args(argv)
    if args.command == "pipeline":
        return tasks_cli.guarded(lambda: _pipeline(args))
    if args.command == "dvc-yaml":  # the pipeline's and the experiments'
        code = tasks_cli.dispatch(args)
        return code or tasks_cli.guarded(lambda: experiments_cli.write_dvc_yaml(args.check), quiet=True)
    if args.command == "mlflow-ui":
        return tasks_cli.guarded(lambda: _mlflow_ui(args) or 0, quiet=True)
    if args.command == "experiments":
        args.command = args.experiments_command
        if args.command == "dvc-yaml":
            return tasks_cli.guarded(lambda: experiments_cli.write_dvc_yaml(args.check), quiet=True)
        if args.command == "run":
            return tasks_cli.guarded(lambda: _experiment(args))
        return tasks_cli.guarded(lambda: experiments_cli.run_command(args))
    return tasks_cli.dispatch(args)
