"""experiments/dvc.yaml, generated from the plans and params.yaml (`python -m experiments dvc-yaml`).

One matrix stage per experiment, one instance per (variant, seed) of its plan, each training what its rows need
and writing a small record; one report stage per experiment. The variants and seeds are written out from the
resolved configuration, so a partial params.yaml (or one that only names a profile) works, and a stage run by DVC
refuses to start when the file no longer matches params.yaml.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from engine.atomic import atomic_path
from engine.errors import KDError
from experiments.plans import PLANS, build_plan
from tasks.config import profile_path, read_yaml, validate
from tasks.dvc_yaml import PARAMS_FILE, _present, _rel
from tasks.stage import SHARED_CODE
from tasks.train import CODE as TRAIN_CODE

PATH = Path("experiments") / "dvc.yaml"
HEADER = """\
# Generated from the experiments' plans (experiments/plans.py) and params.yaml by `python -m experiments dvc-yaml`
# (or `takd dvc-yaml`); do not edit. Run with `dvc repro experiments/dvc.yaml` or one stage, e.g.
# `dvc repro experiments/dvc.yaml:report@ta-sweep`. Trainings live in data/zoo by content: a flow's are reused here.
"""
SECTIONS = ("data", "teacher", "assistant", "student", "kd", "cache", "experiments", "profile")
REPORT_FILES = ("table.md", "table.csv", "table.json", "accuracy.png", "plot.csv")


def _common(raw: dict, cfg, root: Path, code: tuple[str, ...]) -> dict:
    deps = [*SHARED_CODE, *code] + ([_rel(profile_path(cfg.profile), root)] if cfg.profile else [])
    return {"wdir": "..", "deps": deps, "params": [s for s in SECTIONS if _present(raw, s)]}


def _jobs(name: str, cfg, raw: dict, root: Path) -> dict:
    plan = build_plan(name, cfg)
    variants = list(dict.fromkeys(r.variant for r in plan.rows))
    common = _common(raw, cfg, root, (*TRAIN_CODE, "tasks/launch.py", "experiments/plans.py", "experiments/run.py",
                                      "experiments/cli.py"))
    return {"matrix": {"variant": variants, "seed": list(cfg.student.seeds)}, "wdir": "..",
            "cmd": f"python -m experiments job {name} --variant ${{item.variant}} --seed ${{item.seed}}",
            "deps": [*common["deps"], "data/prepared"], "params": common["params"],
            "outs": [f"data/experiments/{name}/runs/${{item.variant}}-s${{item.seed}}.json"]}


def _report(cfg, raw: dict, root: Path) -> dict:
    folder = "data/experiments/${item.name}"
    common = _common(raw, cfg, root, (*TRAIN_CODE, "tasks/launch.py", "tasks/report.py", "tasks/figures.py",
                                      "experiments"))
    return {"matrix": {"name": list(PLANS)}, "wdir": "..", "cmd": "python -m experiments report ${item.name}",
            "deps": [*common["deps"], f"{folder}/runs"], "params": [*common["params"], "tracking"],
            "outs": [{f"{folder}/report/{f}": {"cache": False, "persist": True}} for f in REPORT_FILES],
            "metrics": [{f"{folder}/report/metrics.json": {"cache": False, "persist": True}}]}


def _plots() -> list:
    report = "../data/experiments/{}/report/{}"
    sized = [n for n in PLANS if n.endswith("sweep")]
    return [*(report.format(n, "accuracy.png") for n in PLANS),
            {"experiment_means": {"template": "bar_horizontal_sorted", "x": "mean",
                                  "y": {report.format(n, "plot.csv"): "label" for n in PLANS if n not in sized},
                                  "title": "Student test accuracy (%), mean over seeds"}},
            {"size_sweeps": {"template": "scatter", "x": "params",
                             "y": {report.format(n, "plot.csv"): "mean" for n in sized},
                             "title": "Student test accuracy (%) against size"}}]


def generate(root: Path) -> str:
    raw = read_yaml(root / PARAMS_FILE) if (root / PARAMS_FILE).exists() else {}
    cfg = validate(raw, PARAMS_FILE)
    root = root.resolve()
    stages = {name: _jobs(name, cfg, raw, root) for name in PLANS} | {"report": _report(cfg, raw, root)}
    return HEADER + yaml.safe_dump({"stages": stages, "plots": _plots()}, sort_keys=False, width=120)


def write(root: Path) -> bool:
    text, path = generate(root), root / PATH
    if path.exists() and path.read_text() == text:
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def check_in_step(root: Path) -> None:
    """Under `dvc repro`: refuse to run from an experiments/dvc.yaml that params.yaml has moved away from."""
    path = root / PATH
    if not path.exists() or path.read_text() != generate(root):
        raise KDError(f"{path}: does not match params.yaml and the experiments' plans (seeds, sizes or a profile "
                      "changed); run `takd dvc-yaml` to regenerate it, then `dvc repro`")

