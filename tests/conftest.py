from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.config import DataConfig
from tests.fakes import write_fashion

os.environ.setdefault("KD_TRACKING", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
for _k, _v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_k, _v)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    return write_fashion(tmp_path_factory.mktemp("fashion"))


@pytest.fixture
def data_cfg(fashion_dir, tmp_path) -> DataConfig:
    return DataConfig(source_dir=str(fashion_dir), root=str(tmp_path / "raw"))


def tiny_overrides(fashion_dir: Path, root: Path) -> dict:
    """A whole pipeline in seconds: tiny data, one epoch, small models."""
    return {"data.source_dir": str(fashion_dir), "data.root": str(root / "raw"),
            "teacher.arch": "plain-4", "assistant.arch": "plain-2", "student.arch": "plain-2",
            "teacher.train.epochs": 1, "assistant.train.epochs": 1, "student.train.epochs": 1,
            "teacher.train.batch_size": 64, "assistant.train.batch_size": 64, "student.train.batch_size": 64,
            "evaluate.speed_repeats": 1, "cache.batch_size": 256, "student.seeds": [0, 1],
            # INT8 rows cost an ONNX export per model, QAD a training per seed: tests/test_stages.py turns them on
            "quantize.evaluate": False, "quantize.qad_epochs": 0}


@pytest.fixture
def project(tmp_path, fashion_dir, monkeypatch):
    """An empty project root for stage outputs, and the tiny config."""
    from tasks.catalog import Catalog
    from tasks.config import load_config

    monkeypatch.setenv("KD_PROJECT_ROOT", str(tmp_path))
    cfg = load_config(None, tiny_overrides(fashion_dir, tmp_path))
    return cfg, Catalog(tmp_path)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server (SQLite) for the whole session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(autouse=True)
def _log_handlers_outlive_captured_streams():
    """A log handler made during a test (Prefect's console handler when a test first imports Prefect, the root
    handler a stage command's `main()` adds) keeps that test's captured stream, which is closed after it; a later
    test on the same worker would then log into a closed file. Point such handlers at the session's stream."""
    yield
    import logging
    import sys

    loggers = [logging.root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in (h for lg in loggers for h in lg.handlers):
        console = getattr(handler, "console", None)  # rich's Console, in Prefect's handler
        if console is not None and getattr(console.file, "closed", False):
            console.file = sys.stderr
        elif isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr  # not setStream: it would flush the closed one first
