"""`python -m experiments`: list, and the two commands DVC stages call.

  list                         the experiments and how many trainings each needs
  job NAME --variant V --seed S   train part of a plan in this process; write its record (DVC matrix stage)
  report NAME                  train what is missing, then write the tables and plots (DVC)

`takd experiments run NAME` runs one as a Prefect flow (takd/cli.py).

Every config field is a flag, as for `python -m tasks` (`--student.seeds "[0,1,2,3,4]"`).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from engine.atomic import save_json
from engine.errors import KDError
from experiments import dvc_yaml
from experiments.plans import PLANS, build_plan
from tasks.catalog import Catalog
from tasks.cli import add_params_flags, config_from, guarded, prepare_process
from tasks.train_job import all_jobs


def build_parser(prog: str = "python -m experiments") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def add_commands(sub) -> None:
    """list, job, report and dvc-yaml. `takd experiments run` (takd/cli.py) adds the Prefect flow."""
    add_params_flags(sub.add_parser("list", help="the experiments and how many trainings each needs"))
    p = sub.add_parser("dvc-yaml", help="write experiments/dvc.yaml from the plans and params.yaml")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when it is out of date")
    for name, help_text in (("job", "train part of a plan in this process and write its record (DVC)"),
                            ("report", "train what is missing, then write the tables and plots (DVC)")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_plan_args(p, selection=name == "job")
        add_params_flags(p)


def add_plan_args(p: argparse.ArgumentParser, selection: bool) -> None:
    p.add_argument("name", choices=list(PLANS))
    if selection:
        p.add_argument("--variant", default="*", help="only the variants matching this glob")
        p.add_argument("--seed", type=int, default=None, help="only this seed")


def selected_plan(args: argparse.Namespace, cfg):
    plan = build_plan(args.name, cfg)
    if not plan.select(args.variant, args.seed):
        variants = ", ".join(dict.fromkeys(r.variant for r in plan.rows))
        raise KDError(f"{args.name}: no rows match --variant {args.variant!r} --seed {args.seed}; "
                      f"variants: {variants}; seeds: {cfg.student.seeds}")
    return plan


def record_path(cat: Catalog, name: str, variant: str, seed: int | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", variant if variant != "*" else "all")
    return str(cat.experiment(name) / "runs" / f"{slug}-{'all' if seed is None else f's{seed}'}.json")


def run_command(args: argparse.Namespace):
    from tasks import tracking

    cfg = tracking.for_experiments(config_from(args))
    cat = Catalog.default()
    if os.environ.get("DVC_STAGE", "").startswith(f"{dvc_yaml.PATH}:"):
        dvc_yaml.check_in_step(cat.root)
    if args.command == "list":
        return {name: {"rows": len(p.rows), "trainings": len(all_jobs(cfg, [r.job for r in p.rows + p.references])),
                       "title": p.title} for name, p in ((n, build_plan(n, cfg)) for n in PLANS)}
    from experiments.run import run_rows

    if args.command == "job":
        plan = selected_plan(args, cfg)
        results = run_rows(plan, cfg, cat, args.variant, args.seed)
        record = {"experiment": args.name, "variant": args.variant, "seed": args.seed,
                  "jobs": {jid: {k: r.get(k) for k in ("test_acc", "model_fingerprint", "arch")}
                           for jid, r in results.items()}}
        save_json(record, record_path(cat, args.name, args.variant, args.seed))
        return record
    from experiments.report import report_experiment

    plan = build_plan(args.name, cfg)
    result = report_experiment(plan, cfg, cat, run_rows(plan, cfg, cat))
    tracking.end_file_parent(cfg, cat)  # DVC's stages shared one parent run; the report closes it
    return result


def write_dvc_yaml(check: bool) -> int:
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
