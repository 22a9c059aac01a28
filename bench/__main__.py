"""python -m bench [--suite NAME ...] [--repeats N] [--scale F]: run benchmark suites, merge
their results into docs/benchmarks.json and rewrite docs/benchmarks.md."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import SUITES
from bench.common import Context, machine
from bench.report import markdown
from engine.atomic import atomic_path
from engine.config import DataConfig
from engine.device import resolve_device


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--suite", nargs="+", choices=list(SUITES), default=list(SUITES), help="default: all")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    p.add_argument("--scale", type=float, default=1.0, help="share of the standard sizes (quick looks: 0.1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--source-dir", default=DataConfig().source_dir, help="Fashion-MNIST files")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.json"))
    p.add_argument("--md", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--force-gpu-suite", action="store_true", help="run the GPU suite on a CPU (a code-path check)")
    return p.parse_args(argv)


def _commit() -> str:
    """The code measured: HEAD, marked when the working tree has uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    return f"{head}{'+changes' if dirty.strip() else ''}" or "unknown"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None, extra: dict | None = None) -> dict:
    args = parse(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    device = resolve_device(args.device)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="takd-bench-") as scratch:
        ctx = Context(DataConfig(source_dir=args.source_dir, root=str(Path(scratch) / "raw")), device, Path(scratch),
                      repeats=args.repeats, scale=args.scale,
                      extra={"force_gpu_suite": args.force_gpu_suite, **(extra or {})})
        for name in args.suite:
            print(f"== {SUITES[name].title}", flush=True)
            t0 = time.perf_counter()
            result = SUITES[name].module.run(ctx)
            results[name] = {**result, "command": command.strip(), "commit": _commit(), "repeats": args.repeats, "scale": args.scale,
                             "machine": machine(device), "wall_s": time.perf_counter() - t0,
                             "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
            write(args.out, json.dumps(results, indent=2, default=str) + "\n")  # each suite lands as it ends
            write(args.md, markdown(results))
    print(f"wrote {args.out} and {args.md}")
    return results


if __name__ == "__main__":
    main()
