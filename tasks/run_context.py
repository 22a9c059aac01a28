"""How this process runs its stages, resolved once where the process starts and passed down from there.

Every entry point (the stage CLI that `dvc repro` calls, a Prefect flow, `python -m experiments`) resolves one
RunContext from its environment and hands it to what it runs; nothing below reads or writes the environment. A
process that launches another (tasks/launch.py) passes its context on in that child's environment only.

- `threads`: torch's intra-op threads, set once for the whole process (KD_THREADS, else torch's default, the
  physical cores). A CPU's float sums depend on it, so every runner gives a training the same count.
- `parent`: the MLflow run this invocation's runs nest under. A flow opens it and hands it down; the stages of one
  `dvc repro` find theirs by `invocation` (tasks/tracking.py); a stage run alone opens none.
- `invocation`: under `dvc repro`, the `dvc` process every stage of that repro runs under.
- `flow_run`: the Prefect flow run that launched this process, tagged on every MLflow run.
- `store`: the MLflow store: the user's MLFLOW_TRACKING_URI, else the project's SQLite file. It is never logged.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

ENV_ROOT, ENV_THREADS, ENV_TRACKING = "KD_PROJECT_ROOT", "KD_THREADS", "KD_TRACKING"
ENV_PARENT, ENV_FLOW_RUN = "KD_MLFLOW_PARENT_RUN", "KD_PREFECT_FLOW_RUN_ID"


def project_root(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(ENV_ROOT, ".")).resolve()


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def dvc_invocation(environ: Mapping[str, str] = os.environ) -> str | None:
    """Under `dvc repro` (DVC_STAGE set): the `dvc` process above this one, as host:pid:start time."""
    if not environ.get("DVC_STAGE"):
        return None
    import psutil  # DVC's own dependency: present wherever `dvc repro` runs

    proc = psutil.Process().parent()
    while proc is not None:
        try:
            argv = proc.cmdline()
        except psutil.Error:
            break
        if any(Path(a).name == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
            return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"
        proc = proc.parent()
    return None


@dataclass(frozen=True)
class RunContext:
    root: Path
    threads: int
    tracking: bool = False
    store: str = ""
    parent: str | None = None
    flow_run: str | None = None
    invocation: str | None = None
    dvc_stage: str | None = None  # the stage `dvc repro` asked this process to run

    @classmethod
    def resolve(cls, root: Path | None = None, environ: Mapping[str, str] = os.environ) -> "RunContext":
        root = Path(root).resolve() if root else project_root(environ)
        threads = int(environ[ENV_THREADS]) if environ.get(ENV_THREADS) else _default_threads()
        return cls(root=root, threads=threads, tracking=environ.get(ENV_TRACKING, "1") != "0",
                   store=environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}",
                   parent=environ.get(ENV_PARENT) or None, flow_run=environ.get(ENV_FLOW_RUN) or None,
                   invocation=dvc_invocation(environ), dvc_stage=environ.get("DVC_STAGE") or None)

    def apply(self) -> "RunContext":
        """The process-wide settings, once, at the entry point."""
        import torch

        torch.set_num_threads(self.threads)
        return self

    def under(self, parent: str | None, flow_run: str | None = None) -> "RunContext":
        return replace(self, parent=parent, flow_run=flow_run or self.flow_run)

    def child_env(self) -> dict[str, str]:
        """What a process this one launches needs to know (beside the environment it inherits)."""
        env = {ENV_ROOT: str(self.root), ENV_THREADS: str(self.threads), ENV_TRACKING: "1" if self.tracking else "0"}
        env |= {k: v for k, v in ((ENV_PARENT, self.parent), (ENV_FLOW_RUN, self.flow_run)) if v}
        return env

    def public(self) -> dict:
        """As a flow shows it among a task's parameters: without the store, which may hold credentials."""
        return {"root": str(self.root), "threads": self.threads, "tracking": self.tracking, "parent": self.parent,
                "flow_run": self.flow_run}
