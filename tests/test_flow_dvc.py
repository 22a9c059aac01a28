"""Prefect and DVC agree: a flow run leaves `dvc status` clean, a `dvc repro` leaves the
flow nothing to do, and a student parameter reruns only the student's stages."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tasks.config import load_config, to_yaml
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
STUDENT_STAGES = {"train-student-nokd", "distill-student-blkd", "distill-student-takd", "fine-tune-student",
                  "evaluate", "report", "export"}


def sh(args, cwd, **kw):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "KD_TRACKING": "0"}
    env.pop("KD_PROJECT_ROOT", None)
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def make_repo(dest: Path, fashion_dir: Path, **overrides) -> Path:
    for item in ("engine", "models", "tasks", "flows", "experiments", "dvc.yaml", ".dvcignore", "prefect.yaml",
                 ".gitignore"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    for cache in dest.rglob("__pycache__"):
        shutil.rmtree(cache)
    (dest / "params.yaml").write_text(to_yaml(load_config(None, tiny_overrides(fashion_dir, dest) | overrides)))
    sh(["git", "init", "-q"], dest)
    sh([str(Path(sys.executable).parent / "dvc"), "init", "-q"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], dest)
    return dest


def dvc(repo, *args):
    return sh([str(Path(sys.executable).parent / "dvc"), *args], repo)


def stale_stages(repo) -> set[str]:
    import json

    return set(json.loads(dvc(repo, "status", "--json", "dvc.yaml") or "{}"))


def test_dvc_repro_then_flow_reuses_everything(tmp_path, fashion_dir, prefect_server, monkeypatch):
    repo = make_repo(tmp_path / "repo", fashion_dir)
    out = dvc(repo, "repro")
    assert "Running stage 'report'" in out
    again = dvc(repo, "repro")
    assert "didn't change, skipping" in again or "up to date" in again
    assert stale_stages(repo) == set()
    metrics = dvc(repo, "metrics", "show")
    for col in ("nokd.test_acc", "blkd.test_acc", "takd.test_acc"):
        assert col in metrics
    dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").exists()

    monkeypatch.setenv("KD_PROJECT_ROOT", str(repo))
    from flows.pipeline import takd_pipeline

    result = takd_pipeline(load_config(repo / "params.yaml"))
    assert len(result["reused"]) == 12

    # A student parameter alone: only the student stages are stale, teacher and caches are not.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["student"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stale_stages(repo) == STUDENT_STAGES - {"evaluate", "report", "export"}  # those follow from their deps
    sh(["git", "checkout", "params.yaml"], repo)

    # ...and `dvc exp run -S` with it reruns exactly those stages.
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline"], repo)
    out = dvc(repo, "exp", "run", "-S", "student.seed=1")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == STUDENT_STAGES


def test_flow_run_leaves_dvc_status_clean(tmp_path, fashion_dir, prefect_server, monkeypatch):
    repo = make_repo(tmp_path / "repo", fashion_dir)
    monkeypatch.setenv("KD_PROJECT_ROOT", str(repo))
    from flows.pipeline import takd_pipeline

    result = takd_pipeline(load_config(repo / "params.yaml"))
    assert result["reused"] == [] and set(result["test_acc"]) >= {"nokd", "blkd", "takd"}
    assert stale_stages(repo) == set()
    assert "Data and pipelines are up to date" in dvc(repo, "repro")


def test_dvc_yaml_lists_the_code_each_stage_hashes():
    from tasks.catalog import CODE_DEPS
    from tasks.stages import STAGES

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    kind = {"prepare-data": "prepare-data", "evaluate": "evaluate", "report": "report", "export": "export"}
    for name, stage in stages.items():
        k = kind.get(name, "cache" if name.startswith("cache-") else "train")
        code = [d for d in stage["deps"] if not d.startswith("data/")]
        assert code == CODE_DEPS[k], name
        assert stage["cmd"] == f"python -m tasks {name}"


def test_experiment_as_dvc_matrix_stages(tmp_path, fashion_dir):
    """`dvc repro` of one experiment's report: one matrix stage per (method, seed), then the
    table; a rerun does nothing, and the metrics and plots are DVC's."""
    import json

    repo = make_repo(tmp_path / "repo", fashion_dir, **{"experiments.seeds": [0]})
    out = dvc(repo, "repro", "experiments/dvc.yaml:report@comparison")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"prepare-data", "experiments/dvc.yaml:report@comparison"} | {
        f"experiments/dvc.yaml:comparison@{m}-0" for m in ("nokd", "blkd", "takd")}
    records = sorted((repo / "data/experiments/comparison/runs").glob("*.json"))
    assert [r.name for r in records] == ["blkd-s0.json", "nokd-s0.json", "takd-s0.json"]
    table = json.loads((repo / "data/experiments/comparison/report/table.json").read_text())
    takd = json.loads((repo / "data/experiments/comparison/runs/takd-s0.json").read_text())
    student = next(j for jid, j in takd["jobs"].items() if jid.startswith("student-"))
    assert next(r for r in table["rows"] if r["variant"] == "takd")["per_seed"]["0"] == student["test_acc"]
    assert "takd_minus_blkd" in dvc(repo, "metrics", "show", "data/experiments/comparison/report/metrics.json")
    assert "didn't change, skipping" in dvc(repo, "repro", "experiments/dvc.yaml:report@comparison")
