"""The command lines: `takd`, `python -m tasks` and `python -m experiments` start light (their `--help` imports no
heavy library: tasks/cli.py's LazySubParsers), and each subcommand's help lists its own options. How fast they start is
measured with a benchmark command, not asserted here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "prefect", "mlflow", "dvc", "numpy", "pydantic")


def _run(*args: str) -> subprocess.CompletedProcess:
    # cwd=ROOT puts this checkout first on sys.path, whatever the installed package points at.
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["takd", "tasks", "experiments"])
def test_help_prints_every_subcommand(module):
    out = _run("-m", module, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: {'takd' if module == 'takd' else 'python -m ' + module}")
    if module != "experiments":
        from tasks.stages import STAGES

        assert all(f"    {name}" in out.stdout for name in STAGES)


def test_building_the_parsers_and_their_help_imports_no_heavy_library():
    probe = f"""
import sys
from takd.cli import build_parser as takd
from tasks.cli import build_parser as tasks
from experiments.cli import build_parser as experiments

for build, argv in ((takd, []), (tasks, []), (experiments, []), (takd, ["experiments"]), (takd, ["mlflow-ui"]),
                    (takd, ["dvc-yaml"]), (experiments, ["dvc-yaml"])):
    build().format_help()
    try:
        build().parse_args([*argv, "--help"])
    except SystemExit as e:
        assert e.code == 0, argv
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = _run("-c", probe)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", "import these where they are used, not at the top of a CLI module"


def test_the_cli_s_copy_of_the_stage_table_matches_it():
    from tasks.cli import STAGE_COMMANDS
    from tasks.stages import STAGES

    assert list(STAGE_COMMANDS.items()) == [(name, stage.per_seed) for name, stage in STAGES.items()], \
        "copy tasks.stages.STAGES' names and per_seed into tasks.cli.STAGE_COMMANDS"


def _help(argv: list[str], capsys) -> str:
    from takd.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_each_subcommand_s_help_lists_its_own_options(capsys):
    from tasks.stages import STAGES

    per_seed = next(name for name, stage in STAGES.items() if stage.per_seed)
    once = next(name for name, stage in STAGES.items() if not stage.per_seed)
    for name, has_seed in ((per_seed, True), (once, False)):
        out = _help([name], capsys)
        assert ("--seed" in out) == has_seed and "--force" in out and "--student.train.epochs" in out, name
    out = _help(["mlflow-ui"], capsys)
    assert "--port" in out and "--params" in out and "--data.name" not in out and "--profile" not in out
    out = _help(["dvc-yaml"], capsys)
    assert "--check" in out and "--params" not in out
    out = _help(["pipeline"], capsys)
    assert "--stages" in out and "--workers" in out and "--seed" not in out and "--student.train.epochs" in out
    out = _help(["experiments", "run"], capsys)
    assert "--variant" in out and "--workers" in out and "comparison" in out


def test_predict_offers_the_engines_predict_knows(capsys):
    from takd.cli import build_parser
    from tasks.predict import ENGINES

    assert f"--engine {{{','.join(ENGINES)}}}" in _help(["predict"], capsys)
    for engine in ENGINES:
        assert build_parser().parse_args(["predict", "a.png", "--engine", engine]).engine == engine
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "a.png", "--engine", "no-such-engine"])


def test_a_stage_command_line_still_gives_its_config_overrides():
    from takd.cli import build_parser as takd_parser
    from tasks.cli import build_parser, config_from

    argv = ["train-student-nokd", "--seed", "1", "--student.train.epochs", "2", "--params", str(ROOT / "params.yaml")]
    for parser in (build_parser(), takd_parser()):
        args = parser.parse_args(argv)
        assert args.command == "train-student-nokd" and args.seed == 1 and not args.force
        assert config_from(args).student.train.epochs == 2
    args = takd_parser().parse_args(["experiments", "run", "comparison", "--seed", "0", "--workers", "3",
                                     "--kd.lam", "0.25", "--params", str(ROOT / "params.yaml")])
    assert (args.experiments_command, args.name, args.seed, args.workers) == ("run", "comparison", 0, 3)
    assert config_from(args).kd.lam == 0.25
