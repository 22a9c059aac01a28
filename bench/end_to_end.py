"""The default pipeline from scratch, as a new user runs it, in fresh clones.

- `dvc repro` in one clone, then its no-op rerun (median of several).
- The Prefect flow in a second clone with a fresh PREFECT_HOME: the process's wall time
  counts Prefect's temporary server starting; the flow run's own time does not.
Both clones start from the committed HEAD with an empty DVC cache and no outputs.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Context
from tasks.config import load_config
from tasks.stages import instances

REPO = Path(__file__).resolve().parents[1]
_DROP = ("KD_PROJECT_ROOT", "KD_MLFLOW_PARENT_RUN", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "KD_TRACKING")


def _env(ctx: Context, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROP} | ctx.extra.get("env", {})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= {"PREFECT_HOME": str(home / "prefect_home"), "DVC_NO_ANALYTICS": "1", "GIT_PYTHON_REFRESH": "quiet",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    return env


def _run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def _clone(ctx: Context, name: str, env: dict) -> Path:
    dest = ctx.workdir / name
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True)
    if ctx.extra.get("params_yaml"):  # the tests' tiny configuration, and the dvc.yaml that lists what it reads
        (dest / "params.yaml").write_text(ctx.extra["params_yaml"])
        _run([sys.executable, "-m", "tasks", "dvc-yaml"], dest, env)
    return dest


def _stage_seconds(root: Path) -> dict[str, float]:
    """Each stage instance's own wall time from its stage.json, by dvc.yaml stage name, in pipeline order."""
    found = {}
    for path in (root / "data").rglob("stage.json"):
        record = json.loads(path.read_text())
        found[record["stage"]] = record["result"].get("stage_seconds")
    return {i.id: found.get(i.id) for i in instances(load_config(root / "params.yaml"))}


def _test_acc(root: Path) -> dict[str, float]:
    rows = json.loads((root / "data" / "metrics" / "comparison_plot.json").read_text())
    return {r["method"]: r["test_acc"] for r in rows}


def run(ctx: Context) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dvc_root = ctx.workdir / "e2e-dvc"
    env = _env(ctx, dvc_root)
    _clone(ctx, "e2e-dvc", env)
    repro_s, _ = _run(["dvc", "repro"], dvc_root, env)
    ctx.log(f"  dvc repro from scratch: {repro_s:.0f} s")
    noop = [_run(["dvc", "repro"], dvc_root, env)[0] for _ in range(ctx.repeats)]

    flow_root = ctx.workdir / "e2e-prefect"
    env = _env(ctx, flow_root)
    _clone(ctx, "e2e-prefect", env)
    process_s, out = _run([sys.executable, "-m", "bench.flow_timer"], flow_root, env)
    flow = json.loads(out.strip().splitlines()[-1])
    ctx.log(f"  Prefect flow: {process_s:.0f} s with server start, {flow['flow_s']:.0f} s flow run")
    _, status = _run(["dvc", "status", "dvc.yaml"], flow_root, env)

    dvc_stages, flow_stages = _stage_seconds(dvc_root), _stage_seconds(flow_root)
    rows = [{"stage": s, "dvc_repro_s": dvc_stages.get(s), "prefect_flow_s": flow_stages.get(s)} for s in dvc_stages]
    same = _test_acc(dvc_root) == _test_acc(flow_root)
    return {"rows": rows, "summary": {
        "commit": commit, "dvc_repro_from_scratch_s": repro_s, "dvc_repro_noop_s": statistics.median(noop),
        "dvc_repro_noop_runs_s": [round(s, 2) for s in noop],
        "prefect_process_s_with_server_start": process_s, "prefect_flow_run_s": flow["flow_s"],
        "prefect_import_s": flow["import_s"], "prefect_flow_state": flow["state"],
        "dvc_status_clean_after_flow": "up to date" in status,
        "same_test_accuracy_both_ways": same, "test_acc": _test_acc(dvc_root)}}
