"""Run a stage once: skip it when its outputs were made from identical inputs, config and code.

Each stage owns one output folder and writes `stage.json` there last. Its key hashes the
stage's config, its inputs' keys and its code (catalog.CODE_DEPS, the deps dvc.yaml lists),
so Prefect, DVC and the CLI agree on what is done whoever ran it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from engine.atomic import save_json
from engine.fingerprint import config_fingerprint
from tasks.catalog import CODE_DEPS, Catalog

STAGE_FILE = "stage.json"
CODE_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("kd")


def code_hash(root: Path, paths: list[str]) -> str:
    h = hashlib.sha256()
    for rel in paths:
        p = root / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def read_stage(out_dir: Path) -> dict | None:
    path = out_dir / STAGE_FILE
    return json.loads(path.read_text()) if path.exists() else None


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


def run_once(cat: Catalog, name: str, kind: str, out_dir: Path, inputs: dict,
             fn: Callable[[str, Path], dict], force: bool = False) -> dict:
    """`fn(key, folder)` writes the stage's outputs into `folder` and returns a JSON-able summary.

    The folder is a fresh staging folder; it replaces `out_dir` only once it is complete,
    with stage.json written last. A failure at any point leaves the previous outputs whole.
    """
    key = config_fingerprint({"stage": name, "inputs": inputs, "code": code_hash(CODE_ROOT, CODE_DEPS[kind])})
    with stage_lock(cat, name):
        done = read_stage(out_dir)
        if done and done.get("key") == key and not force:
            log.info("%s: outputs in %s are up to date; reusing them", name, out_dir)
            return {**done["result"], "reused": True}
        staging, old = out_dir.with_name(out_dir.name + ".partial"), out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        t0 = time.time()
        result = fn(key, staging)
        result["stage_seconds"] = round(time.time() - t0, 2)
        save_json({"stage": name, "key": key, "inputs": inputs, "result": result}, staging / STAGE_FILE)
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return {**result, "reused": False}


def stage_key(out_dir: Path, what: str) -> str:
    """The key of a finished upstream stage; a missing one is a clear error, not a guess."""
    done = read_stage(out_dir)
    if not done:
        from engine.errors import KDError

        raise KDError(f"{out_dir}: {what} has not been produced yet (no {STAGE_FILE}); run its stage first")
    return done["key"]
