"""One notion of done, whoever runs the pipeline: the CLI, the Prefect flow and `dvc repro` rerun exactly
the stages whose inputs changed (a user's image folder or CSV, an imported teacher file, a parameter),
and a run by one leaves nothing to do for the others."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tasks.config import load_config, to_yaml
from tests.conftest import tiny_overrides
from tests.fakes import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def sh(args, cwd, ok=True):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "KD_TRACKING": "0"}
    env.pop("KD_PROJECT_ROOT", None)
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert (out.returncode == 0) == ok, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def make_repo(dest: Path, overrides: dict, setup=None) -> Path:
    """A git + DVC project with this checkout's code, `overrides` as params.yaml and dvc.yaml generated for it."""
    dest.mkdir(parents=True)
    for item in ("engine", "models", "tasks", "flows", "experiments", "takd", "profiles", ".dvcignore", "prefect.yaml",
                 ".gitignore"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    for cache in dest.rglob("__pycache__"):
        shutil.rmtree(cache)
    if setup:
        setup(dest)
    write_params(dest, overrides)
    sh(["git", "init", "-q"], dest)
    sh([BIN / "dvc", "init", "-q"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], dest)
    return dest


def write_params(repo: Path, overrides: dict) -> None:
    (repo / "params.yaml").write_text(to_yaml(load_config(None, overrides)))
    sh([sys.executable, "-m", "takd", "dvc-yaml"], repo)


def edit_params(repo: Path, **dotted) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in dotted.items():
        node = params
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(repo, *args, ok=True):
    return sh([BIN / "dvc", *args], repo, ok)


def stale(repo) -> set[str]:
    return set(json.loads(dvc(repo, "status", "--json", "dvc.yaml") or "{}"))


# ---------------------------------------------------------------- the three entry points

def keys(repo: Path) -> dict[str, str]:
    """Every finished stage's key, by instance id."""
    from tasks.catalog import Catalog
    from tasks.stages import instances

    cat = Catalog(repo)
    out = {}
    for inst in instances(load_config(repo / "params.yaml")):
        path = inst.out(cat) / "stage.json"
        out[inst.id] = json.loads(path.read_text())["key"] if path.exists() else None
    return out


def run_cli(repo: Path, monkeypatch) -> None:
    from tasks.cli import main
    from tasks.stages import STAGES

    monkeypatch.chdir(repo)
    monkeypatch.setenv("KD_PROJECT_ROOT", str(repo))
    for name in STAGES:
        assert main([name]) == 0


def run_flow(repo: Path, monkeypatch) -> None:
    from flows.pipeline import takd_pipeline

    monkeypatch.chdir(repo)
    monkeypatch.setenv("KD_PROJECT_ROOT", str(repo))
    takd_pipeline(load_config(repo / "params.yaml"), workers=2)
    assert stale(repo) == set()  # the flow recorded its outputs in dvc.lock: `dvc status` is clean


def run_dvc(repo: Path, monkeypatch) -> set[str]:
    out = dvc(repo, "repro")
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


ENTRY = {"cli": run_cli, "flow": run_flow, "dvc": run_dvc}


def rerun(entry: str, repo: Path, monkeypatch) -> set[str]:
    """Run the whole pipeline through `entry`; the instances that did work (their key changed)."""
    before = keys(repo)
    dvc_ran = ENTRY[entry](repo, monkeypatch)
    after = keys(repo)
    ran = {i for i in after if after[i] != before.get(i)}
    if entry == "dvc":  # DVC's notion of stale and the stage keys agree
        assert dvc_ran == ran
    return ran


# ---------------------------------------------------------------- a user's image folder and teacher file

def own_inputs(repo: Path) -> None:
    write_image_folder(repo / "own" / "images", classes=3, per_class=14, size=20)
    torch.manual_seed(0)
    from models import build_model

    torch.save(build_model("plain-4", 3, 3, 16).state_dict(), repo / "own" / "teacher.pt")


OWN = {"data.name": "imagefolder:own/images", "data.image_size": 16, "data.channels": 3,
       "teacher.arch": "plain-4", "teacher.checkpoint": "own/teacher.pt", "assistant.arch": "plain-2",
       "student.arch": "plain-2", "student.seeds": [0], "assistant.train.epochs": 1, "student.train.epochs": 1,
       "assistant.train.batch_size": 16, "student.train.batch_size": 16, "evaluate.speed_repeats": 0,
       "export.check_images": 8}
STUDENTS = {"train-student-nokd@0", "distill-student-blkd@0", "distill-student-takd@0", "fine-tune-student@0",
            "distill-student-qad@0"}
TEACHER_ON = {"train-teacher", "cache-teacher", "distill-assistant", "cache-assistant", "distill-student-blkd@0",
              "distill-student-takd@0", "fine-tune-student@0", "distill-student-qad@0"}
AFTER = {"evaluate", "report", "export"}
EVERYTHING = {"prepare-data", "train-teacher", "cache-teacher", "distill-assistant", "cache-assistant"} | STUDENTS | AFTER


def test_changed_inputs_rerun_exactly_the_stages_that_read_them_whoever_runs_them(tmp_path, prefect_server,
                                                                                     monkeypatch):
    """Each kind of change, made between runs by different entry points: all three compute one key per stage (the
    flow launches the commands DVC runs, the CLI is that command), so what one finds stale the others would too."""
    repo = make_repo(tmp_path / "repo", OWN, own_inputs)
    assert rerun("flow", repo, monkeypatch) == EVERYTHING
    assert rerun("dvc", repo, monkeypatch) == set()  # the flow recorded its outputs in dvc.lock
    assert rerun("cli", repo, monkeypatch) == set()

    edit_params(repo, **{"evaluate.speed_repeats": 1})  # read by evaluate and export; the report reads evaluate's
    assert rerun("dvc", repo, monkeypatch) == AFTER  # and DVC ran exactly the stages whose key moved

    edit_params(repo, **{"student.train.lr": 0.02})  # a student parameter: the students and what follows
    assert rerun("cli", repo, monkeypatch) == STUDENTS | AFTER

    torch.manual_seed(1)  # the teacher file replaced in place: the teacher's chain, not the data or NOKD
    from models import build_model

    torch.save(build_model("plain-4", 3, 3, 16).state_dict(), repo / "own" / "teacher.pt")
    assert rerun("cli", repo, monkeypatch) == TEACHER_ON | AFTER

    victim = sorted((repo / "own" / "images" / "class_1").iterdir())[0]
    victim.unlink()  # an image deleted from the user's folder: the data set and everything after it
    assert rerun("flow", repo, monkeypatch) == EVERYTHING
    prepared = json.loads((repo / "data" / "prepared" / "stage.json").read_text())["result"]["sizes"]
    assert sum(prepared.values()) == 3 * 14 - 1
    assert rerun("dvc", repo, monkeypatch) == set()

    metrics = dvc(repo, "metrics", "show")
    for col in ("nokd.test_acc_mean", "takd_minus_blkd.mean", "teacher.test_acc"):
        assert col in metrics
    dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").exists()


def csv_inputs(repo: Path) -> None:
    write_image_folder(repo / "own" / "images", classes=2, per_class=12, size=12)
    rows = [f"images/class_{c}/{i}.png,{'ab'[c]}" for c in range(2) for i in range(12)]
    (repo / "own" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize("entry", ["cli", "flow", "dvc"])
def test_a_changed_csv_or_an_image_it_lists_reruns_prepare_data(entry, tmp_path, prefect_server, monkeypatch):
    repo = make_repo(tmp_path / "repo", {**OWN, "data.name": "csv:own/labels.csv", "data.image_size": 12,
                                         "teacher.checkpoint": None, "teacher.arch": "plain-2",
                                         "teacher.train.epochs": 1}, csv_inputs)
    deps = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["prepare-data"]["deps"]
    assert {"own/labels.csv", "own/images"} <= set(deps)  # the CSV, and the folder holding every image it lists

    def prepare() -> bool:
        before = keys(repo)["prepare-data"]
        if entry == "cli":
            monkeypatch.chdir(repo)
            monkeypatch.setenv("KD_PROJECT_ROOT", str(repo))
            from tasks.cli import main

            assert main(["prepare-data"]) == 0
        elif entry == "flow":  # the flow's stages up to prepare-data (its other stages: the test above)
            from flows.pipeline import takd_pipeline

            monkeypatch.chdir(repo)
            monkeypatch.setenv("KD_PROJECT_ROOT", str(repo))
            takd_pipeline(load_config(repo / "params.yaml"), stages=["prepare-data"])
        else:
            dvc(repo, "repro", "prepare-data")
        return keys(repo)["prepare-data"] != before

    assert prepare() and not prepare()
    csv = repo / "own" / "labels.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:-1]) + "\n")  # one row fewer
    assert prepare() and not prepare()
    image = repo / "own" / "images" / "class_0" / "3.png"
    image.write_bytes((repo / "own" / "images" / "class_1" / "3.png").read_bytes())  # an image's content changed
    assert prepare() and not prepare()


def test_dvc_refuses_a_stage_whose_dvc_yaml_does_not_list_what_it_reads(tmp_path):
    repo = make_repo(tmp_path / "repo", OWN, own_inputs)
    shutil.copytree(repo / "own" / "images", repo / "own" / "other")
    edit_params(repo, **{"data.name": "imagefolder:own/other"})  # params.yaml changed, dvc.yaml not regenerated
    out = dvc(repo, "repro", "prepare-data", ok=False)
    assert "stage prepare-data does not match params.yaml (its deps lack own/other); run `takd dvc-yaml`" in out
    sh([sys.executable, "-m", "takd", "dvc-yaml"], repo)
    dvc(repo, "repro", "prepare-data")


def test_the_committed_dvc_yaml_is_generated_from_the_stage_table():
    from tasks.dvc_yaml import generate

    assert (ROOT / "dvc.yaml").read_text() == generate(ROOT), "run `python -m tasks dvc-yaml` and commit dvc.yaml"


def test_experiment_as_dvc_matrix_stages(tmp_path, fashion_dir):
    """`dvc repro` of one experiment's report: one matrix stage per (method, seed), then the
    table; a rerun does nothing, and the metrics and plots are DVC's."""
    repo = make_repo(tmp_path / "repo", tiny_overrides(fashion_dir, tmp_path / "repo") | {"student.seeds": [0]})
    out = dvc(repo, "repro", "experiments/dvc.yaml:report@comparison")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"fetch-data", "prepare-data", "experiments/dvc.yaml:report@comparison"} | {
        f"experiments/dvc.yaml:comparison@{m}-0" for m in ("nokd", "blkd", "takd")}
    records = sorted((repo / "data/experiments/comparison/runs").glob("*.json"))
    assert [r.name for r in records] == ["blkd-s0.json", "nokd-s0.json", "takd-s0.json"]
    table = json.loads((repo / "data/experiments/comparison/report/table.json").read_text())
    takd = json.loads((repo / "data/experiments/comparison/runs/takd-s0.json").read_text())
    student = next(j for jid, j in takd["jobs"].items() if jid.startswith("student-"))
    assert next(r for r in table["rows"] if r["variant"] == "takd")["per_seed"]["0"] == student["test_acc"]
    assert "takd_minus_blkd" in dvc(repo, "metrics", "show", "data/experiments/comparison/report/metrics.json")
    assert "didn't change, skipping" in dvc(repo, "repro", "experiments/dvc.yaml:report@comparison")
