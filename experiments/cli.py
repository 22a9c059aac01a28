"""`python -m experiments`: list, run (the Prefect flow), and the two commands DVC stages call.

  list                         the experiments and how many trainings each needs
  run NAME [--workers N | --dask-workers N | --dask-address tcp://...]   the Prefect flow
  job NAME --variant V --seed S   train part of a plan in this process; write its record (DVC matrix stage)
  report NAME                  train what is missing, then write the tables and plots (DVC)

Every config field is a flag, as for `python -m tasks` (`--experiments.seeds "[0,1,2,3,4]"`).
"""
from __future__ import annotations

import argparse
import re

from engine.atomic import save_json
from engine.errors import KDError
from experiments.plans import PLANS, build_plan
from tasks.catalog import Catalog
from tasks.cli import add_config_flags, guarded, overrides, prepare_process
from tasks.config import load_config
from tasks.train_job import all_jobs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="the experiments and how many trainings each needs")
    p.add_argument("--params", default="params.yaml")
    add_config_flags(p)
    for name, help_text in (("run", "run an experiment as a Prefect flow"),
                            ("job", "train part of a plan in this process and write its record (DVC)"),
                            ("report", "train what is missing, then write the tables and plots (DVC)")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("name", choices=list(PLANS))
        p.add_argument("--params", default="params.yaml", help="YAML file of parameters (default: params.yaml)")
        if name in ("run", "job"):
            p.add_argument("--variant", default="*", help="only the variants matching this glob")
            p.add_argument("--seed", type=int, default=None, help="only this seed")
        if name == "run":
            p.add_argument("--workers", type=int, default=1, help="trainings at once, in threads")
            p.add_argument("--dask-workers", type=int, default=0, help="start a local Dask cluster of N processes")
            p.add_argument("--dask-address", default=None, help="join this Dask scheduler, e.g. tcp://10.0.0.5:8786")
        add_config_flags(p)
    return parser


def record_path(cat: Catalog, name: str, variant: str, seed: int | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", variant if variant != "*" else "all")
    return str(cat.experiment(name) / "runs" / f"{slug}-{'all' if seed is None else f's{seed}'}.json")


def main(argv: list[str] | None = None) -> int:
    prepare_process()
    args = build_parser().parse_args(argv)

    def command():
        cfg = load_config(args.params, overrides(args))
        cat = Catalog.default()
        if args.command == "list":
            return {name: {"rows": len(p.rows), "trainings": len(all_jobs(cfg, [r.job for r in p.rows + p.references])),
                           "title": p.title} for name, p in ((n, build_plan(n, cfg)) for n in PLANS)}
        plan = build_plan(args.name, cfg)
        if args.command in ("run", "job") and not plan.select(args.variant, args.seed):
            variants = ", ".join(dict.fromkeys(r.variant for r in plan.rows))
            raise KDError(f"{args.name}: no rows match --variant {args.variant!r} --seed {args.seed}; "
                          f"variants: {variants}; seeds: {cfg.experiments.seeds}")
        if args.command == "run":
            from flows.experiment import FLOWS, task_runner

            runner = task_runner(args.workers, args.dask_address, args.dask_workers)
            return FLOWS[args.name].with_options(task_runner=runner)(cfg, args.variant, args.seed)
        from experiments.run import run_rows

        if args.command == "job":
            results = run_rows(plan, cfg, cat, args.variant, args.seed)
            record = {"experiment": args.name, "variant": args.variant, "seed": args.seed,
                      "jobs": {jid: {k: r.get(k) for k in ("test_acc", "model_fingerprint", "arch")}
                               for jid, r in results.items()}}
            save_json(record, record_path(cat, args.name, args.variant, args.seed))
            return record
        from experiments.report import report_experiment
        from tasks import tracking

        result = report_experiment(plan, cfg, cat, run_rows(plan, cfg, cat))
        tracking.end_file_parent(cat)  # DVC's stages shared one parent run; the report closes it
        return result

    return guarded(command)
