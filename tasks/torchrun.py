"""A training or cache stage over several processes: the stage command starts itself again under torchrun.

`python -m tasks <stage>` (what `dvc repro`, the CLI and the Prefect flow run) sees `distributed` ask for more than one
process and runs `torchrun ... -m tasks <stage>` with the same arguments, on this machine's share of the processes;
with `nnodes` > 1 the same command on every machine meets at `rdzv_endpoint`. Each process then runs the stage as a
rank (tasks/stage.py: rank 0 decides, writes and tracks). This process waits, passes the ranks' log lines on, and
returns rank 0's summary, or one error that says which rank failed and why.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from engine.distributed import check_devices
from engine.device import resolve_device
from engine.errors import KDError
from engine.fingerprint import config_fingerprint
from tasks.config import DistributedConfig, PipelineConfig
from tasks.launch import ENV_RESULT
from tasks.run_context import ENV_THREADS, RunContext


def command(d: DistributedConfig, argv: list[str], run_id: str) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, the same program) starting `python -m tasks <argv>`."""
    out = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={d.nproc_per_node}",
           f"--nnodes={d.nnodes}", "--max-restarts=0", f"--rdzv-conf=join_timeout={d.join_timeout_s:g}"]
    if d.nnodes == 1:
        out.append("--standalone")  # a rendezvous on a free local port
    else:
        out += ["--rdzv-backend=c10d", f"--rdzv-endpoint={d.rdzv_endpoint}", f"--rdzv-id={run_id}"]
    return [*out, "-m", "tasks", *argv]


def _reason(tail: list[str], d: DistributedConfig) -> str:
    """What went wrong, from the ranks' and torchrun's last lines."""
    said = [t.split("error: ", 1)[1] for t in tail if "error: " in t]
    if said:
        return said[-1]
    if any("RendezvousTimeoutError" in t or "RendezvousClosedError" in t for t in tail):
        return (f"the {d.nnodes} machine(s) did not all join within {d.join_timeout_s:g} s "
                f"(distributed.join_timeout_s) at {d.rdzv_endpoint or 'this machine'}; start the same stage command "
                "on every machine, and check that rdzv_endpoint is reachable from each")
    text = "\n".join(tail)
    rank, code = re.search(r"rank\s*:\s*(\d+)", text), re.search(r"exitcode\s*:\s*(-?\d+)", text)
    if rank and code:
        how = f"signal {-int(code.group(1))}" if int(code.group(1)) < 0 else f"exit code {code.group(1)}"
        return (f"rank {rank.group(1)} stopped ({how}); the others were stopped with it. Rerun the stage: it resumes "
                "from the last epoch checkpoint")
    return "\n".join(tail[-10:])


def relaunch(cfg: PipelineConfig, argv: list[str], ctx: RunContext, run_id: str) -> dict:
    """Run `python -m tasks <argv>` under torchrun with cfg.distributed's processes; rank 0's summary."""
    d = cfg.distributed
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        import torch

        check_devices(d.nproc_per_node, device, torch.cuda.device_count())
    with tempfile.TemporaryDirectory(prefix="kd-torchrun-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, ENV_RESULT: str(result), ENV_THREADS: str(max(1, ctx.threads // d.nproc_per_node)),
               "PYTHONUNBUFFERED": "1"}
        tail: deque[str] = deque(maxlen=60)
        proc = subprocess.Popen(command(d, argv, f"{run_id}-{config_fingerprint(cfg.model_dump(mode='json'))[:12]}"),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1)
        try:
            for line in proc.stderr:
                sys.stderr.write(line)
                tail.append(line.rstrip("\n"))
            proc.wait()
        finally:
            if proc.poll() is None:  # this process was interrupted: the ranks go with it
                proc.terminate()
                proc.wait()
        if proc.returncode != 0:
            raise KDError(f"{' '.join(argv[:1])} over {d.processes} processes failed: {_reason(list(tail), d)}")
        if not result.exists():
            raise KDError(f"{' '.join(argv[:1])}: torchrun ended without rank 0's summary")
        return json.loads(result.read_text())
