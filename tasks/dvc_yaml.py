"""dvc.yaml, generated from the stage table and params.yaml (`python -m tasks dvc-yaml`).

Each stage's deps are its code, the files it reads (a data set's files, a user's image folder or
CSV and the images it lists, an imported teacher), the profile params.yaml names, and the
outputs of the stages it needs; its params are the config fields its key hashes. So DVC calls a
stage stale exactly when the stage's own key (tasks/stages.py) would change. A stage that DVC
runs refuses to start when dvc.yaml no longer matches params.yaml (a new image folder, say).
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from engine.atomic import atomic_path
from engine.errors import KDError
from tasks.catalog import Catalog
from tasks.config import PipelineConfig, profile_path, read_yaml, validate
from tasks.stage import SHARED_CODE
from tasks.stages import FETCH_STAGE, STAGES, Instance, Stage, reads

HEADER = """\
# Generated from the stage table (tasks/stages.py) and params.yaml by `python -m tasks dvc-yaml`; do not edit.
# Every cmd is the stage's command, which the Prefect flow launches too. Outs persist: the stage decides from its
# key (stage.json), which hashes what these deps and params cover, whether anything must be redone.
"""
ITEM = "${item}"
PARAMS_FILE = "params.yaml"


def _rel(path: Path, root: Path) -> str:
    """Config paths are relative to the current folder, as the stages read them; dvc.yaml's are relative to the root."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _present(raw: dict, key: str) -> bool:
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _profile_dep(cfg: PipelineConfig, root: Path) -> list[str]:
    return [_rel(profile_path(cfg.profile), root)] if cfg.profile else []


def _upstream_paths(stage: Stage, cat: Catalog) -> list[Path]:
    out = []
    for name in stage.needs:
        up = STAGES[name]
        if up.per_seed and not stage.per_seed:
            out.append(cat.models)  # every seed's model; DVC links the stages whose outs lie inside
        else:
            out.append(Instance(up, ITEM if up.per_seed else None).out(cat))
    return out


def _without_nested(paths: list[str]) -> list[str]:
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in unique)]


def stage_entry(stage: Stage, cfg: PipelineConfig, raw: dict, root: Path) -> dict:
    cat = Catalog(Path("."))
    deps = [*SHARED_CODE, *stage.code, *(_rel(p, root) for p in reads(stage, cfg, Catalog(root)))]
    deps += _profile_dep(cfg, root)
    deps += [str(p) for p in _upstream_paths(stage, cat)]
    entry = {"cmd": "python -m " + " ".join(Instance(stage, ITEM if stage.per_seed else None).command()),
             "deps": _without_nested(deps),
             "params": [p for p in (*stage.params, "profile") if _present(raw, p)],
             "outs": [{str(Instance(stage, ITEM if stage.per_seed else None).out(cat)): {"persist": True}}]}
    if stage.metrics:
        entry["metrics"] = [{m: {"cache": False, "persist": True}} for m in stage.metrics]
    if stage.plots:
        entry["plots"] = [{p: {"cache": False, "persist": True}} for p in stage.plots]
    if not stage.per_seed:
        return entry
    seeds = "${student.seeds}" if _present(raw, "student.seeds") else list(cfg.student.seeds)
    return {"foreach": seeds, "do": entry}


def fetch_entry(cfg: PipelineConfig, raw: dict, root: Path) -> dict | None:
    """The stage that copies or downloads a named data set into data.root, so that a fresh clone's `dvc repro`
    has the files its first stage lists as deps. Its outs are not cached: they are a copy of public files."""
    fetches = [s.fetch for s in STAGES.values() if s.fetch and s.fetch.makes(cfg)]
    if not fetches:
        return None
    params = [p for f in fetches for p in (*f.params, "profile") if _present(raw, p)]
    return {"cmd": f"python -m tasks {FETCH_STAGE}",
            "deps": list(dict.fromkeys(c for f in fetches for c in f.code)) + _profile_dep(cfg, root),
            **({"params": list(dict.fromkeys(params))} if params else {}),
            "outs": [{_rel(p, root): {"cache": False, "persist": True}} for f in fetches for p in f.makes(cfg)]}


PLOTS = [
    {"learning_curves": {"template": "linear", "x": "epoch", "y": {"data/metrics/curves": "val_acc"},
                         "title": "Validation accuracy per epoch (one line per model)"}},
    {"data/metrics/comparison_plot.json": {"template": "bar_horizontal_sorted", "x": "test_acc", "y": "method",
                                           "title": "Test accuracy, mean over the student seeds"}},
    "data/reports/comparison.png",
    "data/reports/curves.png",
]


def generate(root: Path, params: str = PARAMS_FILE) -> str:
    raw = read_yaml(root / params) if (root / params).exists() else {}
    cfg = validate(raw, params)
    fetch = fetch_entry(cfg, raw, root.resolve())
    stages = {s.name: stage_entry(s, cfg, raw, root.resolve()) for s in STAGES.values()}
    doc = {"stages": ({FETCH_STAGE: fetch} if fetch else {}) | stages, "plots": PLOTS}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def write(root: Path) -> bool:
    """Write dvc.yaml; True when it changed."""
    text, path = generate(root), root / "dvc.yaml"
    if path.exists() and path.read_text() == text:
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def check_in_step(cfg: PipelineConfig, cat: Catalog, stage: Stage) -> None:
    """Under `dvc repro`: refuse to run when dvc.yaml does not list what this stage reads."""
    path = cat.root / "dvc.yaml"
    raw = read_yaml(cat.root / PARAMS_FILE) if (cat.root / PARAMS_FILE).exists() else {}
    want = stage_entry(stage, cfg, raw, cat.root.resolve())
    have = (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(stage.name) if path.exists() else None
    if have != want:
        inner = lambda e: (e or {}).get("do", e) or {}  # noqa: E731
        missing = [d for d in inner(want).get("deps", []) if d not in inner(have).get("deps", [])]
        detail = f"its deps lack {', '.join(missing)}" if missing else "it differs from the stage table"
        raise KDError(f"{path}: stage {stage.name} does not match params.yaml ({detail}); run "
                      "`takd dvc-yaml` (or `python -m tasks dvc-yaml`) to regenerate it, then `dvc repro`")
