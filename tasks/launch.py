"""Each stage and each training in a process of its own.

A flow (flows/) and an experiment's DVC stage launch the same commands `dvc repro` runs (`python -m tasks
<stage>`, `python -m experiments train ...`), one new process each. What a training computes then never depends
on what runs beside it (torch's thread pool and its other process-wide state belong to one training), and a stage
that times a model times it in a process that does nothing else.

The new process is forked from a server process that has imported the project's code and nothing else
(multiprocessing's forkserver), so it starts in a fraction of a second instead of the seconds that importing
torch and MLflow takes; it then runs the command's `__main__` as `python -m` would, in the launcher's folder, with
an environment that is the launcher's plus its RunContext (the MLflow parent, the flow run, the threads). Where a
process may not have children of its own (a Dask worker is daemonic), the command starts as a new interpreter. The
child's configuration comes as a file (`config_file`); it writes its summary to the file KD_RESULT_FILE names and
its log to a file the launcher follows line by line.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Callable

from engine.atomic import atomic_path
from engine.errors import KDError
from tasks.catalog import Catalog
from tasks.config import PipelineConfig, to_yaml
from tasks.run_context import ENV_FLOW_RUN, ENV_PARENT, RunContext

ENV_RESULT = "KD_RESULT_FILE"
# Run state of the launching process that a child must not inherit: the child's own comes from its context.
NOT_INHERITED = (ENV_PARENT, ENV_FLOW_RUN, ENV_RESULT, "DVC_STAGE")
# What the fork server imports once, so that no child pays for it: the commands and their stages (ONNX, ONNX Runtime
# and matplotlib with them), torch (with the compiler stack its optimizers import), MLflow's client, store and model
# flavour. When a flow launches, also the flows and Prefect's engine: a child first imports its launcher's main
# module again (multiprocessing's rule), and a flow's is `takd`, a flow script, or `prefect.engine`.
PRELOAD = ["tasks.cli", "tasks.stages", "tasks.tracking", "tasks.evaluate", "tasks.report", "tasks.export",
           "experiments.cli", "experiments.report", "engine.distill", "torch._dynamo", "mlflow", "mlflow.pytorch",
           "mlflow.store.tracking.sqlalchemy_store"]
PRELOAD_FLOWS = ["prefect.engine", "flows.pipeline", "flows.experiment", "takd.cli"]
log = logging.getLogger("kd")


class LaunchError(KDError):
    pass


def config_file(cfg: PipelineConfig, cat: Catalog, name: str) -> Path:
    """The whole configuration as a params file a child reads with --params (the same config, key for key)."""
    path = cat.state / "configs" / f"{name}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(to_yaml(cfg))
    return path


def _main(argv: list[str], env: dict[str, str], cwd: str, log_file: str) -> None:
    """In the new process: the command's `__main__`, as `python -m` runs it, its output into `log_file`."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    with open(log_file, "ab", buffering=0) as out, open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)  # the summary goes to the result file; stdout's JSON would only repeat it
        os.dup2(out.fileno(), 2)
    from tasks.cli import configure_logging

    configure_logging(force=True)
    sys.argv = [f"python -m {argv[0]}", *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


class _Exec:
    """The command as a new interpreter, where a fork server cannot start children: in a daemonic process, such as
    a Dask worker's. The same `__main__`, only slower to start."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, log_file: str):
        with open(log_file, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", *argv], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                         stderr=out)

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self.proc.kill()

    @property
    def exitcode(self) -> int | None:
        return self.proc.returncode


def _start(argv: list[str], env: dict[str, str], log_file: str):
    if multiprocessing.current_process().daemon:
        return _Exec(argv, env, os.getcwd(), log_file)
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(PRELOAD + (PRELOAD_FLOWS if "prefect" in sys.modules else []))
    proc = mp.Process(target=_main, args=(argv, env, os.getcwd(), log_file))
    proc.start()
    return proc


def _follow(path: Path, position: int, emit: Callable[[str], None], tail: deque) -> int:
    """Emit the complete lines written since `position`; returns the new position."""
    with open(path, "rb") as f:
        f.seek(position)
        data = f.read()
    lines = data.split(b"\n")
    for line in lines[:-1]:
        text = line.decode(errors="replace").rstrip("\r")
        tail.append(text)
        emit(text)
    return position + len(data) - len(lines[-1])


def launch(argv: list[str], ctx: RunContext, log_line: Callable[[str], None] = log.info) -> dict:
    """`python -m <argv>` in a new process with `ctx`; its log lines go to `log_line`; returns its summary."""
    with tempfile.TemporaryDirectory(prefix="kd-launch-") as tmp:
        result, out = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        out.touch()
        env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
        env |= ctx.child_env() | {ENV_RESULT: str(result), "PYTHONUNBUFFERED": "1"}
        proc = _start(argv, env, str(out))
        tail: deque[str] = deque(maxlen=30)
        position = 0
        try:
            while proc.is_alive():
                proc.join(0.2)
                position = _follow(out, position, log_line, tail)
            _follow(out, position, log_line, tail)
        finally:
            if proc.is_alive():  # the launcher was interrupted: its child goes with it
                proc.kill()
                proc.join()
        if proc.exitcode != 0:
            said = [t for t in tail if t.startswith("error: ")]
            if any("bootstrapping phase" in t for t in tail):
                said = ["error: the script that started this flow runs it when it is imported, and each stage's "
                        "new process imports that script first; call the flow under `if __name__ == '__main__':`"]
            raise LaunchError(f"`python -m {' '.join(argv)}` failed (exit {proc.exitcode}): "
                              + (said[-1][len("error: "):] if said else "\n".join(tail)))
        return json.loads(result.read_text())
