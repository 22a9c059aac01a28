"""Run a stage once: skip it when its outputs were made from identical inputs, config and code.

Each stage owns one output folder and writes `stage.json` there last. Its key hashes what the
stage table (tasks/stages.py) says the stage depends on: its config fields, the content of
every file it reads and of every upstream output, and its code. Those are exactly the deps
and params dvc.yaml lists (it is generated from the same table), so Prefect, DVC and the CLI
agree on what is done, whoever ran it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from engine.atomic import save_json
from engine.errors import KDError
from engine.fingerprint import config_fingerprint
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.content import code_hash

STAGE_FILE = "stage.json"
CODE_ROOT = Path(__file__).resolve().parents[1]
# The code every stage runs; a stage's own module comes on top (the stage table names it).
SHARED_CODE = ("engine", "models", "tasks/config.py", "tasks/catalog.py", "tasks/stage.py", "tasks/stages.py",
               "tasks/context.py", "tasks/content.py")
log = logging.getLogger("kd")


@dataclass(frozen=True)
class StageRun:
    """What a stage's work function gets: the config, the catalog, its seed (per-seed stages),
    the staging folder to write into, and its key."""

    cfg: PipelineConfig
    cat: Catalog
    seed: int | None
    out: Path
    key: str


def read_stage(out_dir: Path) -> dict | None:
    path = out_dir / STAGE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def require(out_dir: Path, what: str) -> dict:
    """A finished upstream stage's record; a missing one is a clear error, not a guess."""
    done = read_stage(out_dir)
    if not done:
        raise KDError(f"{out_dir}: {what} has not been produced yet (no {STAGE_FILE}); run its stage first")
    return done


def stage_key(out_dir: Path, what: str) -> str:
    return require(out_dir, what)["key"]


@contextmanager
def stage_lock(cat: Catalog, name: str) -> Iterator[None]:
    """Two runs of one stage (two flows, or a flow and `dvc repro`) take turns; the second
    then finds the first's outputs and reuses them."""
    path = cat.state / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another run holds %s; waiting for it", name, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run_once(cat: Catalog, name: str, out_dir: Path, inputs: dict, code: tuple[str, ...],
             fn: Callable[[str, Path], dict], force: bool = False) -> dict:
    """`fn(key, folder)` writes the stage's outputs into `folder` and returns a JSON-able summary.

    The folder is a fresh staging folder; it replaces `out_dir` only once it is complete,
    with stage.json written last. A failure at any point leaves the previous outputs whole,
    and the staging folder is removed.
    """
    key = config_fingerprint({"stage": name, "inputs": inputs, "code": code_hash(CODE_ROOT, [*SHARED_CODE, *code])})
    with stage_lock(cat, name):
        done = read_stage(out_dir)
        if done and done.get("key") == key and not force:
            log.info("%s: outputs in %s are up to date; reusing them", name, out_dir)
            return {**done["result"], "reused": True}
        staging, old = out_dir.with_name(out_dir.name + ".partial"), out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            t0 = time.time()
            result = fn(key, staging)
            result["stage_seconds"] = round(time.time() - t0, 2)
            save_json({"stage": name, "key": key, "inputs": inputs, "result": result}, staging / STAGE_FILE)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return {**result, "reused": False}
