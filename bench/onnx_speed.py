"""python -m bench.onnx_speed FILE [--batch B] [--runs N]: run an exported model N times on random images of
batch B with ONNX Runtime (or PyTorch for a torch.export .pt2 file), on the CPU; print the images per second. Timed from
outside (the whole process, one file against another side by side) it compares fp32 and INT8 files."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from engine.quantize import Runner


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.onnx_speed", description=__doc__)
    p.add_argument("file", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--shape", default="1,28,28", help="C,H,W of one image")
    args = p.parse_args(argv)
    runner = Runner(args.file)
    images = torch.rand(args.batch, *map(int, args.shape.split(",")))
    runner.logits(images)  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.runs):
        runner.logits(images)
    seconds = time.perf_counter() - t0
    out = {"file": str(args.file), "batch": args.batch, "runs": args.runs, "seconds": seconds,
           "images_per_second": args.batch * args.runs / seconds, "ms_per_batch": 1000 * seconds / args.runs}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
