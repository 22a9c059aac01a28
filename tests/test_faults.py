"""Faults: killed runs resume to the same result, failed writes leave earlier artefacts intact,
two runs of one stage take turns, bad input gets one line and a non-zero exit."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tasks.catalog import Catalog
from tasks.cli import main
from tasks.config import load_config, to_yaml
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def write_params(root: Path, fashion_dir: Path, **extra) -> Path:
    cfg = load_config(None, {**tiny_overrides(fashion_dir, root), **extra})
    (root / "params.yaml").write_text(to_yaml(cfg))
    return root / "params.yaml"


def cli(root: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "KD_PROJECT_ROOT": str(root), "KD_TRACKING": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tasks", *args, "--params", str(root / "params.yaml")],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout=120.0) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return out


def test_kill_9_during_training_then_rerun_gives_the_uninterrupted_result(tmp_path, fashion_dir):
    extra = {"teacher.arch": "plain-6", "teacher.train.epochs": 3}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for root in (killed, clean):
        root.mkdir()
        write_params(root, fashion_dir, **extra)
        finish(cli(root, "prepare-data"))
    proc = cli(killed, "train-teacher")
    assert wait_for(Catalog(killed).work("teacher") / "last.pt", proc), "training finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Catalog(killed).model("teacher") / "stage.json").exists()
    resumed_from = torch.load(Catalog(killed).work("teacher") / "last.pt", weights_only=True)["epoch"]
    assert 1 <= resumed_from < 3
    finish(cli(killed, "train-teacher"))
    finish(cli(clean, "train-teacher"))
    a = torch.load(Catalog(killed).model("teacher") / "model.pt", weights_only=True)
    b = torch.load(Catalog(clean).model("teacher") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((Catalog(killed).model("teacher") / "history.json").read_text())
    hb = json.loads((Catalog(clean).model("teacher") / "history.json").read_text())
    assert [h["val_acc"] for h in ha] == [h["val_acc"] for h in hb]


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, fashion_dir) -> Path:
    """A project with its data prepared and its teacher trained, to copy (the copy reuses both)."""
    root = tmp_path_factory.mktemp("teacher") / "p"
    root.mkdir()
    write_params(root, fashion_dir)
    for stage in ("prepare-data", "train-teacher"):
        finish(cli(root, stage))
    return root


# The process kills itself with SIGKILL at one exact point of writing the cache: after values.npy's temp file is
# written but before it is renamed into place; the same for manifest.json (written after values.npy), for stage.json
# (written last), and at the rename of the staging folder onto the final one.
DIE_AT = """
import contextlib, os, pathlib, signal, sys
import engine.atomic as atomic
point, real_path, real_rename = sys.argv[1], atomic.atomic_path, pathlib.Path.rename

@contextlib.contextmanager
def dying(path):
    with real_path(path) as tmp:
        yield tmp
        if pathlib.Path(path).name == point:
            os.kill(os.getpid(), signal.SIGKILL)

def renaming(self, target):
    if point == "rename" and self.name.endswith(".partial"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(self, target)

atomic.atomic_path, pathlib.Path.rename = dying, renaming
from tasks.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("point", ["values.npy", "manifest.json", "stage.json", "rename"])
def test_kill_9_during_caching_never_leaves_a_cache_that_reads_as_complete(tmp_path, trained_teacher, point):
    """The cache is written into cache-teacher's staging folder (soft_targets/teacher.partial) and renamed into
    place only when whole: killed at any point of writing it, the final folder is absent, and a rerun makes it."""
    root = tmp_path / "p"
    shutil.copytree(trained_teacher, root)
    cache = Catalog(root).soft_targets("teacher")
    env = {**os.environ, "KD_PROJECT_ROOT": str(root), "KD_TRACKING": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", DIE_AT, point, "cache-teacher", "--params", str(root / "params.yaml")],
                          cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not cache.exists() and cache.with_name("teacher.partial").exists()
    finish(cli(root, "cache-teacher"))
    assert not cache.with_name("teacher.partial").exists() and (cache / "stage.json").exists()
    if point == "rename":  # the rerun's cache reads: its manifest and sha256 match
        finish(cli(root, "distill-assistant"))


def test_two_runs_of_one_stage_take_turns_and_the_second_reuses(tmp_path, fashion_dir):
    write_params(tmp_path, fashion_dir, **{"teacher.train.epochs": 3})
    finish(cli(tmp_path, "prepare-data"))
    first, second = cli(tmp_path, "train-teacher"), cli(tmp_path, "train-teacher")
    outs = [json.loads(finish(p)) for p in (first, second)]
    assert sorted(o["reused"] for o in outs) == [False, True]
    assert outs[0]["model_fingerprint"] == outs[1]["model_fingerprint"]


def test_corrupt_input_gives_one_line_exit_2_and_writes_nothing(tmp_path, fashion_dir, capsys, monkeypatch):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(fashion_dir, bad)
    raw = (bad / "train-labels-idx1-ubyte.gz").read_bytes()
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(raw[:20])
    monkeypatch.setenv("KD_PROJECT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["prepare-data", "--data.source_dir", str(bad), "--data.root", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-labels-idx1-ubyte.gz: truncated or corrupt gzip file" in err[0]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.pt"))


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EACCES])
def test_disk_full_or_read_only_leaves_earlier_artefacts_intact(project, fashion_dir, capsys, monkeypatch, fault):
    import engine.atomic

    cfg, cat = project
    params = write_params(cat.root, fashion_dir)
    monkeypatch.chdir(cat.root)
    assert main(["prepare-data", "--params", str(params)]) == 0
    assert main(["train-teacher", "--params", str(params)]) == 0
    before = {p: p.read_bytes() for p in cat.model("teacher").iterdir()}
    capsys.readouterr()

    real_mkstemp = engine.atomic.tempfile.mkstemp

    def failing_mkstemp(*a, **kw):  # as root, chmod does not stop writes; fail where the OS would
        raise OSError(fault, os.strerror(fault), str(kw.get("dir", "")))

    monkeypatch.setattr(engine.atomic.tempfile, "mkstemp", failing_mkstemp)
    assert main(["train-teacher", "--params", str(params), "--force"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " INFO " not in line]
    assert len(err) == 1 and err[0].startswith("error: ") and os.strerror(fault) in err[0]
    # outputs are built in a staging folder: the failed rerun left the previous ones whole
    assert {p: p.read_bytes() for p in cat.model("teacher").iterdir()} == before
    assert not list(cat.root.rglob("*.tmp"))
    monkeypatch.setattr(engine.atomic.tempfile, "mkstemp", real_mkstemp)
    assert main(["train-teacher", "--params", str(params), "--force"]) == 0  # and it recovers


def test_two_pipelines_at_once_share_one_mlflow_store_safely(tmp_path, fashion_dir):
    """Two processes run the training stages, one command each, as two users would, into one project: each stage
    trains once and the other reuses it; the store stays whole, and holds each training once."""
    import sqlite3

    # Models are not logged: the store's rows are what two writers contend for, and logging models is slow.
    write_params(tmp_path, fashion_dir, **{"student.seeds": [0, 1], "tracking.log_models": False})
    stages = ["prepare-data", "train-teacher", "train-student-nokd"]
    script = " && ".join(f"{sys.executable} -m tasks {s} --params {tmp_path / 'params.yaml'} > /dev/null" for s in stages)
    env = {**os.environ, "KD_PROJECT_ROOT": str(tmp_path), "KD_TRACKING": "1", "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("KD_MLFLOW_PARENT_RUN", None)
    runs = [subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for p in runs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    db = sqlite3.connect(tmp_path / "mlflow.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Three trainings (the teacher and two NOKD students), each logged once, finished.
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT value) FROM tags WHERE key = 'model'").fetchone() == (3, 3)
    assert db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall() == [("FINISHED", 3)]
    # Stages run alone belong to no invocation: no training nests under a parent.
    assert db.execute("SELECT COUNT(*) FROM tags WHERE key = 'mlflow.parentRunId'").fetchone()[0] == 0
    for name in ("teacher", "student-nokd-s0"):  # one complete, consistent set of outputs per stage
        stage = json.loads((Catalog(tmp_path).model(name) / "stage.json").read_text())
        meta = json.loads((Catalog(tmp_path).model(name) / "model.json").read_text())
        assert stage["result"]["model_fingerprint"] == meta["model_fingerprint"]
    assert not list(tmp_path.rglob("*.partial"))
