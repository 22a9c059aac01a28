"""`python -m experiments`: list, the commands DVC stages call, and the commands of one training or cache.

  list                              the experiments and how many trainings each needs
  job NAME --variant V --seed S     train part of a plan, each training in its own process; write its record (DVC)
  report NAME                       train what is missing, then write the tables and plots (DVC)
  train NAME --job ID               one training of the plan, in this process (what `job`, `report` and the flow launch)
  cache NAME --job ID               the soft targets of one of its trainings, in this process
  reanalyse NAME [NAME ...]         recompute a written report's statistics from its per-seed table (no training)

`takd experiments run NAME` runs one as a Prefect flow (takd/cli.py).

Every config field is a flag, as for `python -m tasks` (`--student.seeds "[0,1,2,3,4]"`).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from engine.errors import KDError
from tasks.catalog import Catalog
from tasks.cli import (LazySubParsers, add_params_flags, check_flag, config_from, guarded, prepare_process,
                       subcommands)

# The plans, their DVC stages and the atomic writes import torch: they are imported where they are used, so that
# building the parser (`takd --help`, `takd experiments --help`) does not (tasks/cli.py, LazySubParsers).


def build_parser(prog: str = "python -m experiments") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(subcommands(parser, "command"))
    return parser


def _plan_command(name: str):
    def fill(p: argparse.ArgumentParser) -> None:
        add_plan_args(p, selection=name == "job")
        if name in ("train", "cache"):
            p.add_argument("--job", required=True, help="the training's id (its folder in data/zoo)")
        add_params_flags(p)
    return fill


def add_commands(sub: LazySubParsers) -> None:
    """list, job, report and dvc-yaml. `takd experiments run` (takd/cli.py) adds the Prefect flow."""
    sub.add_parser("list", fill=add_params_flags, help="the experiments and how many trainings each needs")
    sub.add_parser("dvc-yaml", fill=check_flag("experiments/dvc.yaml"), help="write experiments/dvc.yaml from the plans and params.yaml")
    for name, help_text in (("job", "train part of a plan, each training in its own process, and write its record "
                                    "(DVC)"),
                            ("report", "train what is missing, then write the tables and plots (DVC)"),
                            ("train", "one training of the plan, in this process"),
                            ("cache", "the soft targets of one training of the plan, in this process")):
        sub.add_parser(name, fill=_plan_command(name), help=help_text, description=help_text)
    sub.add_parser("reanalyse", fill=_reanalyse_args,
                   help="recompute written reports' statistics from their per-seed tables, without the trainings "
                        "(the table files only; MLflow keeps what it logged)")


def _reanalyse_args(p: argparse.ArgumentParser) -> None:
    from experiments.plans import PLANS

    p.add_argument("names", nargs="+", choices=list(PLANS), metavar="NAME", help=", ".join(PLANS))


def add_plan_args(p: argparse.ArgumentParser, selection: bool) -> None:
    from experiments.plans import PLANS

    p.add_argument("name", choices=list(PLANS))
    if selection:
        p.add_argument("--variant", default="*", help="only the variants matching this glob")
        p.add_argument("--seed", type=int, default=None, help="only this seed")


def selected_plan(args: argparse.Namespace, cfg):
    from experiments.plans import build_plan

    plan = build_plan(args.name, cfg)
    if not plan.select(args.variant, args.seed):
        variants = ", ".join(dict.fromkeys(r.variant for r in plan.rows))
        raise KDError(f"{args.name}: no rows match --variant {args.variant!r} --seed {args.seed}; "
                      f"variants: {variants}; seeds: {cfg.student.seeds}")
    return plan


def record_path(cat: Catalog, name: str, variant: str, seed: int | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", variant if variant != "*" else "all")
    return str(cat.experiment(name) / "runs" / f"{slug}-{'all' if seed is None else f's{seed}'}.json")


def _one(args: argparse.Namespace, cfg, cat: Catalog, ctx) -> dict:
    """`train` or `cache`: one step of the plan, in this process."""
    from experiments.plans import build_plan
    from experiments.run import steps, work
    from tasks.stage import run_once

    found = next((st for st in steps(build_plan(args.name, cfg)) if (st.kind, st.job) == (args.command, args.job)), None)
    if found is None:
        raise KDError(f"{args.name}: no {args.command} step {args.job!r} in this plan (with this configuration); "
                      "`python -m experiments list` counts its trainings")
    return run_once(cat, work(found, cfg, cat, ctx))


def run_command(args: argparse.Namespace):
    from engine.atomic import save_json
    from experiments import dvc_yaml
    from experiments.plans import PLANS, build_plan
    from tasks import tracking
    from tasks.launch import config_file
    from tasks.run_context import RunContext

    if args.command == "reanalyse":
        from experiments.report import reanalyse

        return {name: reanalyse(Catalog.default().experiment(name) / "report") for name in args.names}
    given = config_from(args)
    cfg, ctx = tracking.for_experiments(given), RunContext.resolve().apply()
    cat = Catalog(ctx.root)
    if ctx.dvc_stage and ctx.dvc_stage.startswith(f"{dvc_yaml.PATH}:"):
        dvc_yaml.check_in_step(cat.root)
    if args.command == "list":
        return {name: {"rows": len(p.rows), "trainings": len(p.trainings()), "title": p.title}
                for name, p in ((n, build_plan(n, cfg)) for n in PLANS)}
    if args.command in ("train", "cache"):
        return _one(args, cfg, cat, ctx)
    from experiments.run import run_rows

    params = config_file(given, cat, f"experiments-{os.getpid()}")  # what the trainings it launches read
    try:
        if args.command == "job":
            plan = selected_plan(args, cfg)
            results = run_rows(plan, cfg, cat, ctx, params, args.variant, args.seed)
            record = {"experiment": args.name, "variant": args.variant, "seed": args.seed,
                      "jobs": {sid: {k: r.get(k) for k in ("test_acc", "model_fingerprint", "arch")}
                               for sid, r in results.items()}}
            save_json(record, record_path(cat, args.name, args.variant, args.seed))
            return record
        from experiments.report import report_experiment

        plan = build_plan(args.name, cfg)
        return report_experiment(plan, cfg, cat, ctx, run_rows(plan, cfg, cat, ctx, params))
    finally:
        params.unlink(missing_ok=True)


def write_dvc_yaml(check: bool) -> int:
    from experiments import dvc_yaml

    root = Catalog.default().root
    if check:
        if (root / dvc_yaml.PATH).exists() and (root / dvc_yaml.PATH).read_text() == dvc_yaml.generate(root):
            return 0
        print(f"error: {root / dvc_yaml.PATH} does not match params.yaml; run `takd dvc-yaml`", file=sys.stderr)
        return 1
    print(f"{dvc_yaml.PATH} " + ("written" if dvc_yaml.write(root) else "already up to date"))
    return 0


def main(argv: list[str] | None = None) -> int:
    prepare_process()
    args = build_parser().parse_args(argv)
    if args.command == "dvc-yaml":
        return guarded(lambda: write_dvc_yaml(args.check), quiet=True)
    return guarded(lambda: run_command(args))
