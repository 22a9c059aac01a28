"""Run a piece of work once: skip it when its outputs were made from identical inputs, config and code.

Each piece of work (a stage instance, an experiment's training or cache) owns one output folder and writes
`stage.json` there last. Its key hashes what decides its outputs (a training's TrainSpec, a cache's settings,
another stage's config fields), the content of every file it reads and of every upstream output, and its code
(tasks/train.py's key_inputs). dvc.yaml lists the same files and at least those config fields (it is generated from
the same stage table), so Prefect, DVC and the CLI agree on what is done, whoever ran it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

from engine.atomic import save_json
from engine.distributed import Ranks, ranks
from engine.errors import KDError
from engine.fingerprint import config_fingerprint
from tasks.catalog import Catalog
from tasks.config import PipelineConfig
from tasks.content import code_hash
from tasks.run_context import RunContext

STAGE_FILE = "stage.json"
CODE_ROOT = Path(__file__).resolve().parents[1]
# The code every stage runs; a stage's own module comes on top (the stage table names it).
SHARED_CODE = ("engine", "models", "tasks/config.py", "tasks/catalog.py", "tasks/stage.py", "tasks/stages.py",
               "tasks/content.py")
log = logging.getLogger("kd")


@dataclass(frozen=True)
class StageRun:
    """What a stage's work function gets: the config, the catalog, the run context, its seed (per-seed stages),
    the staging folder to write into, and its key."""

    cfg: PipelineConfig
    cat: Catalog
    ctx: RunContext
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


def stage_lock(cat: Catalog, name: str):
    """Two runs of one stage (two flows, or a flow and `dvc repro`) take turns; the second
    then finds the first's outputs and reuses them."""
    return state_lock(cat.root, name)


@contextmanager
def state_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock named `name` in the project's .kd/locks, held for the block."""
    path = Catalog(root).state / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another run holds %s; waiting for it", name, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@dataclass(frozen=True)
class Work:
    """A piece of work and its key: a stage instance, a training or a cache. `make(key, folder)` writes the outputs
    into `folder` and returns a JSON-able summary. The key hashes the work's name, its inputs (tasks/train.py's
    key_inputs) and its code."""

    name: str  # in locks and stage.json: train-student-nokd@1, or an experiment's train-<spec id>
    out: Path
    inputs: dict
    code: tuple[str, ...]
    make: Callable[[str, Path], dict]

    @cached_property
    def key(self) -> str:
        return config_fingerprint({"stage": self.name, "inputs": self.inputs,
                                   "code": code_hash(CODE_ROOT, [*SHARED_CODE, *self.code])})

    def done(self) -> dict | None:
        """Its recorded summary when its outputs are up to date, else None."""
        record = read_stage(self.out)
        return record["result"] if record and record.get("key") == self.key else None


def run_once(cat: Catalog, work: Work, force: bool = False) -> dict:
    """Run `work`, unless its outputs are up to date.

    It writes into a fresh staging folder, which replaces `work.out` only once it is complete, with stage.json
    written last. A failure at any point leaves the previous outputs whole, and the staging folder is removed.
    Over several processes (torchrun) rank 0 decides, locks and writes; the others do their share of `make`.
    """
    out_dir, name, group = work.out, work.name, ranks()
    if not group.main:
        return _share(work, group)
    with stage_lock(cat, name):
        done = work.done()
        reuse = done is not None and not force
        group.broadcast((reuse, work.key))
        if reuse:
            log.info("%s: outputs in %s are up to date; reusing them", name, out_dir)
            return {**done, "reused": True}
        staging, old = out_dir.with_name(out_dir.name + ".partial"), out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            t0 = time.time()
            result = work.make(work.key, staging)
            result["stage_seconds"] = round(time.time() - t0, 2)
            save_json({"stage": name, "key": work.key, "inputs": work.inputs, "result": result}, staging / STAGE_FILE)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return {**result, "reused": False}


def _share(work: Work, group: Ranks) -> dict:
    """A rank other than 0: its share of the work rank 0 decided to do, under rank 0's key; it writes nothing."""
    reuse, key = group.broadcast(None)
    if not reuse:
        work.make(key, work.out.with_name(work.out.name + ".partial"))
    return {"reused": reuse, "rank": group.rank}
