"""The default pipeline from scratch, as a new user runs it, in two copies of this working tree: `dvc repro` in one,
the Prefect flow (two stages at once) in the other, and what each made, side by side.

- `dvc repro` from scratch, then its no-op rerun (median of several).
- The Prefect flow with a fresh PREFECT_HOME: the process's wall time counts Prefect's temporary server starting;
  the flow run's own time does not.
- Every model's weights (the SHA-256 of every tensor, engine.fingerprint), every evaluation's accuracy figures, and
  the evaluate stage's latency figures, flow against DVC.
Both copies hold the working tree as it is (committed or not, untracked files included, ignored ones left out),
with an empty DVC cache and no outputs.
"""
from __future__ import annotations

import json
import os
import shutil
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
ACCURACY = ("test_acc", "test_top5", "teacher_agreement", "best_val_acc")
SPEED = ("latency_ms_b1", "throughput_b256")


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


def _copy(ctx: Context, name: str, env: dict) -> Path:
    """The working tree as `git ls-files` sees it (untracked files too, ignored ones not), as a fresh repository."""
    dest = ctx.workdir / name
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    if ctx.extra.get("params_yaml"):  # the tests' small configuration, and the dvc.yaml that lists what it reads
        (dest / "params.yaml").write_text(ctx.extra["params_yaml"])
        _run([sys.executable, "-m", "tasks", "dvc-yaml"], dest, env)
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "copy"]):
        _run(["git", *args], dest, env)
    return dest


def _records(root: Path) -> dict[str, dict]:
    """Each stage instance's stage.json, by dvc.yaml stage name, in pipeline order."""
    found = {}
    for path in (root / "data").rglob("stage.json"):
        record = json.loads(path.read_text())
        found[record["stage"]] = record
    return {i.id: found.get(i.id) for i in instances(load_config(root / "params.yaml"))}


def _models(root: Path) -> dict[str, dict]:
    """Every model's weight fingerprint and evaluation (none when the run stopped before evaluate)."""
    out = {}
    for meta in sorted((root / "data" / "models").glob("*/model.json")):
        name = meta.parent.name
        found = root / "data" / "eval" / f"{name}.json"
        evaluation = json.loads(found.read_text()) if found.exists() else {}
        out[name] = {"weights": json.loads(meta.read_text())["model_fingerprint"],
                     **{k: evaluation.get(k) for k in (*ACCURACY, *SPEED)}}
    return out


def compare(dvc: dict[str, dict], flow: dict[str, dict]) -> dict:
    """Weights and accuracy equal model by model; the flow's latency over DVC's."""
    differ = sorted(n for n in dvc.keys() | flow.keys() if dvc.get(n, {}).get("weights") != flow.get(n, {}).get("weights"))
    metrics = sorted(n for n in dvc.keys() & flow.keys() if any(dvc[n][k] != flow[n][k] for k in ACCURACY))
    ratios = [flow[n]["latency_ms_b1"] / dvc[n]["latency_ms_b1"] for n in dvc.keys() & flow.keys()
              if dvc[n].get("latency_ms_b1") and flow[n].get("latency_ms_b1")]
    return {"models": len(dvc), "same_weights_both_ways": not differ, "weights_differ": differ,
            "same_accuracy_both_ways": not metrics, "accuracy_differs": metrics,
            "latency_flow_over_dvc_median": statistics.median(ratios) if ratios else None,
            "latency_flow_over_dvc_range": [min(ratios), max(ratios)] if ratios else None}


def _profile(root: Path) -> str:
    """The models and epochs the run trained: its accuracies belong to that profile, not to today's."""
    c = load_config(root / "params.yaml")
    said = {m: (getattr(c, m).arch, getattr(c, m).train.epochs) for m in ("teacher", "assistant", "student")}
    return ", ".join(f"{m} {a} {e} epoch{'s' * (e != 1)}" for m, (a, e) in said.items())


def run(ctx: Context) -> dict:
    """`targets` (ctx.extra): only these stages and what they read, both ways (the tests stop at evaluate)."""
    targets = ctx.extra.get("targets", [])
    dvc_root = ctx.workdir / "e2e-dvc"
    env = _env(ctx, dvc_root)
    _copy(ctx, "e2e-dvc", env)
    repro_s, _ = _run(["dvc", "repro", *targets], dvc_root, env)
    ctx.log(f"  dvc repro from scratch: {repro_s:.0f} s")
    noop = [_run(["dvc", "repro", *targets], dvc_root, env)[0] for _ in range(ctx.repeats)]

    flow_root = ctx.workdir / "e2e-prefect"
    env = _env(ctx, flow_root)
    _copy(ctx, "e2e-prefect", env)
    process_s, out = _run([sys.executable, "-m", "bench.flow_timer", "2", *targets], flow_root, env)
    flow = json.loads(out.strip().splitlines()[-1])
    ctx.log(f"  Prefect flow: {process_s:.0f} s with server start, {flow['flow_s']:.0f} s flow run")
    _, status = _run(["dvc", "status", "dvc.yaml"], flow_root, env)

    by_dvc, by_flow = _records(dvc_root), _records(flow_root)
    rows = [{"stage": s, "dvc_repro_s": (by_dvc[s] or {}).get("result", {}).get("stage_seconds"),
             "prefect_flow_s": (by_flow.get(s) or {}).get("result", {}).get("stage_seconds")} for s in by_dvc]
    models = {"dvc": _models(dvc_root), "flow": _models(flow_root)}
    return {"rows": rows, "models": models, "summary": {
        "dvc_repro_from_scratch_s": repro_s, "dvc_repro_noop_s": statistics.median(noop),
        "dvc_repro_noop_runs_s": [round(s, 2) for s in noop],
        "prefect_process_s_with_server_start": process_s, "prefect_flow_run_s": flow["flow_s"],
        "prefect_import_s": flow["import_s"], "prefect_flow_state": flow["state"], "flow_workers": flow["workers"],
        "dvc_status_clean_after_flow": "up to date" in status, "profile": _profile(dvc_root),
        **compare(models["dvc"], models["flow"])}}
