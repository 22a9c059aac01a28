"""`python -m tasks`: run one stage (what `dvc repro` calls), write dvc.yaml, predict.
`takd` (takd/cli.py) adds the Prefect flows on top.

Every field of the config schema is a flag (`--student.arch plain-4`, `--kd.lam 0.9`),
applied on top of params.yaml. Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import typing
from typing import TYPE_CHECKING, Any, Callable

from engine.errors import KDError
from tasks.catalog import Catalog

if TYPE_CHECKING:
    from pydantic import BaseModel

    from tasks.config import PipelineConfig

# Building a parser and printing `--help` imports none of the config schema, torch, Prefect or MLflow: the
# modules below are imported inside the functions that need them, and a subcommand's arguments are added only
# when that subcommand is the one being parsed (LazySubParsers).

# The stage table's names, in its order, and whether each runs per seed: a copy of tasks.stages.STAGES (which
# imports torch) so that listing the subcommands does not import it. tests/test_cli.py keeps the two equal.
STAGE_COMMANDS: dict[str, bool] = {
    "prepare-data": False, "train-teacher": False, "cache-teacher": False, "distill-assistant": False,
    "cache-assistant": False, "train-student-nokd": True, "distill-student-blkd": True, "distill-student-takd": True,
    "fine-tune-student": True, "distill-student-qad": True, "evaluate": False, "report": False, "export": False,
}


class LazySubParsers(argparse._SubParsersAction):
    """Subcommands whose arguments are added when the subcommand is chosen: `add_parser(name, fill=f, ...)` names
    it and gives its help line at once (what the parent's `--help` lists); `f(parser)` adds its arguments just
    before argparse parses the rest of the command line with it, so `takd --help` builds no config flags."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fills: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def add_parser(self, name, fill: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        parser = super().add_parser(name, **kwargs)
        if fill is not None:
            self._fills[name] = fill
        return parser

    def __call__(self, parser, namespace, values, option_string=None):
        if (fill := self._fills.pop(values[0], None)) is not None:
            fill(self._name_parser_map[values[0]])
        super().__call__(parser, namespace, values, option_string)


def subcommands(parser: argparse.ArgumentParser, dest: str) -> LazySubParsers:
    return parser.add_subparsers(dest=dest, required=True, action=LazySubParsers)


def _section(ann: Any) -> type[BaseModel] | None:
    """The settings class of a nested section, also when it is optional (student.kd)."""
    from pydantic import BaseModel

    for t in (ann, *typing.get_args(ann)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, field in model.model_fields.items():
        ann = _section(field.annotation)
        if ann is not None:
            out += _leaf_fields(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", field))
    return out


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    from tasks.config import PipelineConfig

    group = parser.add_argument_group("configuration (overrides params.yaml; values are YAML)")
    for key, field in _leaf_fields(PipelineConfig):
        help_text = (field.description or "").replace("%", "%%")
        group.add_argument(f"--{key}", dest=f"cfg:{key}", metavar="V", default=argparse.SUPPRESS, help=help_text)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    return {k[4:]: yaml.safe_load(v) for k, v in vars(args).items() if k.startswith("cfg:")}


def add_params_file(p: argparse.ArgumentParser, default: str = "params.yaml") -> None:
    p.add_argument("--params", default=None, help=f"YAML file of parameters (default: {default})")


def add_params_flags(p: argparse.ArgumentParser) -> None:
    """What a command that takes a config takes: the file, and every config field as a flag."""
    add_params_file(p, "params.yaml, unless --profile names the profile to start from")
    add_config_flags(p)


def config_from(args: argparse.Namespace):
    """The one merge rule (tasks.config.PipelineConfig): defaults, the profile, the file, then the flags.
    `--profile` alone runs that profile, not params.yaml on top of it."""
    flags = overrides(args)
    path = args.params or (None if "profile" in flags else "params.yaml")
    from tasks.config import load_config

    return load_config(path, flags)


def build_parser(prog: str = "python -m tasks") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Teacher-assistant knowledge distillation: the stages.")
    add_commands(subcommands(parser, "command"))
    return parser


def _predict_args(pred: argparse.ArgumentParser) -> None:
    from tasks.predict import ENGINES

    pred.add_argument("images", nargs="+")
    pred.add_argument("--engine", default="onnx", choices=list(ENGINES))
    pred.add_argument("--export-dir", default=None, help="default: data/export of the project")
    pred.add_argument("--model-uri", default=None, help="mlflow engine; default models:/<registered_model>@<alias>")
    add_params_flags(pred)


def _stage_args(per_seed: bool) -> Callable[[argparse.ArgumentParser], None]:
    def fill(p: argparse.ArgumentParser) -> None:
        if per_seed:
            p.add_argument("--seed", type=int, default=None, help="only this seed's instance")
        p.add_argument("--force", action="store_true", help="redo the stage even if its outputs are up to date")
        add_params_flags(p)
    return fill


def check_flag(written: str) -> Callable[[argparse.ArgumentParser], None]:
    """`dvc-yaml --check`: compare `written` with what would be written, and write nothing."""
    def fill(p: argparse.ArgumentParser) -> None:
        p.add_argument("--check", action="store_true", help=f"only compare; exit 1 when {written} is out of date")
    return fill


def add_commands(sub: LazySubParsers) -> None:
    """The stage subcommands (one per row of the stage table), params, dvc-yaml and predict."""
    sub.add_parser("params", help="print the default params.yaml")
    sub.add_parser("stages", fill=add_params_flags, help="print the stage table (Markdown)")
    sub.add_parser("fetch-data", fill=add_params_flags, help="copy or download a named data set into data.root, so "
                                                              "that dvc.yaml's first dep exists (a no-op when it does)")
    sub.add_parser("dvc-yaml", fill=check_flag("dvc.yaml"), help="write dvc.yaml from the stage table and params.yaml")
    sub.add_parser("predict", fill=_predict_args, help="classify image files with the exported student")
    for name, per_seed in STAGE_COMMANDS.items():
        help_text = f"run the {name} stage" + (" (every seed in student.seeds, or --seed)" if per_seed else "")
        sub.add_parser(name, fill=_stage_args(per_seed), help=help_text, description=help_text)


def configure_logging(force: bool = False) -> None:
    """INFO lines with their time. `force` replaces the root logger's handlers: a launched process (tasks/launch.py)
    has imported libraries that may have given it one that would swallow them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=force)
    for noisy in ("httpx", "httpcore"):  # one line per HTTP request to the local Prefect server
        logging.getLogger(noisy).setLevel(logging.WARNING)


def prepare_process() -> None:
    # Offline by default: no telemetry from Prefect's server or MLflow; quiet when git is absent.
    for key, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("DO_NOT_TRACK", "1"), ("GIT_PYTHON_REFRESH", "quiet")):
        os.environ.setdefault(key, value)
    configure_logging()


def guarded(fn: Callable[[], Any], quiet: bool = False) -> int:
    """Run a command; print its result as JSON (or, quiet, return its exit code), or one line of error and exit 2.
    A launcher (tasks/launch.py) that names a result file gets the result there too."""
    try:
        result = fn()
    except KDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk: writes are atomic, so earlier outputs are intact
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e} (outputs written before this are intact)", file=sys.stderr)
        return 2
    if quiet:
        return result
    if os.environ.get("RANK", "0") != "0":  # one of several processes under torchrun: rank 0 answers
        return 0
    text = json.dumps(result, indent=2, default=str)
    from tasks.launch import ENV_RESULT

    if os.environ.get(ENV_RESULT):
        from engine.atomic import atomic_path

        with atomic_path(os.environ[ENV_RESULT]) as tmp:
            tmp.write_text(text)
    print(text)
    return 0


def _predict(cfg: PipelineConfig, args: argparse.Namespace, ctx) -> list[dict]:
    from pathlib import Path

    from tasks.predict import predict

    cat = Catalog(ctx.root)
    uri = args.model_uri or f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"
    return predict(args.images, Path(args.export_dir) if args.export_dir else cat.export, args.engine, uri, ctx)


def _dvc_yaml(check: bool) -> int:
    from tasks import dvc_yaml

    root = Catalog.default().root
    if check:
        if (root / "dvc.yaml").exists() and (root / "dvc.yaml").read_text() == dvc_yaml.generate(root):
            return 0
        print(f"error: {root / 'dvc.yaml'} does not match the stage table and params.yaml; run "
              "`python -m tasks dvc-yaml`", file=sys.stderr)
        return 1
    print("dvc.yaml " + ("written" if dvc_yaml.write(root) else "already up to date"))
    return 0


def run_command(args: argparse.Namespace) -> Any:
    """What every stage subcommand, and `predict`, does once the config is read: in a process of its own (the
    entry point resolves its RunContext, and sets its threads, once)."""
    from tasks.run_context import RunContext

    cfg = config_from(args)
    ctx = RunContext.resolve().apply()
    if args.command == "predict":
        return _predict(cfg, args, ctx)
    if args.command == "fetch-data":
        from tasks.stages import fetch_all

        return {"fetched": [str(p) for p in fetch_all(cfg, Catalog(ctx.root))]}
    from engine import distributed
    from tasks.stages import needs_group, run_stage

    seed, cat = getattr(args, "seed", None), Catalog(ctx.root)
    if not distributed.launched():
        if not needs_group(args.command, cfg, cat, ctx, seed, args.force):
            return run_stage(args.command, cfg, cat, seed, args.force, ctx)
        from tasks.torchrun import relaunch

        return relaunch(cfg, args.argv, ctx, f"{args.command}-{seed}")
    # torchrun stops the other ranks with SIGTERM when one fails: exit through Python, so staging is cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    group, _ = distributed.init(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_s)
    if not group.main:  # rank 0 reports progress; the others only their warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return run_stage(args.command, cfg, cat, seed, args.force, ctx)
    finally:
        distributed.close()


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "params":
        from tasks.config import PipelineConfig, to_yaml

        sys.stdout.write(to_yaml(PipelineConfig()))
        return 0
    if args.command == "dvc-yaml":
        return guarded(lambda: _dvc_yaml(args.check), quiet=True)
    if args.command == "stages":
        from tasks.stages import markdown

        return guarded(lambda: sys.stdout.write(markdown(config_from(args))) and 0, quiet=True)
    return guarded(lambda: run_command(args))


def main(argv: list[str] | None = None) -> int:
    prepare_process()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # a stage over several processes starts itself again with them (tasks/torchrun.py)
    return dispatch(args)
