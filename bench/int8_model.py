"""python -m bench.int8_model MODEL OUT: any trained pipeline model (teacher, assistant, student-takd-s0, ...) through
the export's fp32 and INT8 path, into OUT; prints, per file, test accuracy, agreement with fp32, size and speed.
It shows what INT8 does for models of other sizes than the shipped student."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.export import Deployable, to_onnx, to_pt2
from engine.quantize import calibration_images, int8_file, measure
from engine.trainer import predict
from tasks.catalog import Catalog
from tasks.config import QuantizeConfig
from engine.workspace import Workspace


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.int8_model", description=__doc__)
    p.add_argument("model")
    p.add_argument("out", type=Path)
    p.add_argument("--speed-repeats", type=int, default=20)
    args = p.parse_args(argv)
    cat = Catalog.default()
    ws, q = Workspace(cat.prepared, "cpu"), QuantizeConfig()
    model = Deployable(ws.load_model_dir(cat.model(args.model)), ws.mean, ws.std)
    images, labels = ws.test.x.float() / 255, ws.test.y
    to_onnx(model, images[:4], args.out / "model.onnx")
    to_pt2(model, images[:4], args.out / "model.pt2")
    int8 = int8_file(args.out / "model.onnx", calibration_images(ws.train, q.calibration_images, q.calibration_seed))
    reference = predict(model.model, ws.test).argmax(1)
    rows = [measure(f, images, labels, reference, args.speed_repeats)
            for f in (args.out / "model.onnx", args.out / "model.pt2", int8)]
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
