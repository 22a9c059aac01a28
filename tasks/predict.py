"""Predict with the shipped student: image files in, class names out, through the exported
ONNX file or torch.export program, or the model registered in MLflow (pyfunc). All three take the same
input: [N, C, H, W] float32 pixels in [0, 1] (preprocessing.json)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.errors import DataError, KDError

ENGINES = ("onnx", "pt2", "mlflow")


def load_images(paths: list[str], export_dir: Path) -> np.ndarray:
    from PIL import Image

    spec = json.loads((export_dir / "preprocessing.json").read_text())
    c, h, w = spec["input_shape"]
    if spec.get("modalities"):
        raise KDError(f"{export_dir / 'preprocessing.json'}: the student takes {len(spec['modalities'])} paired "
                      f"inputs side by side ({', '.join(spec['modalities'])}); predict reads one image per example. "
                      "Stack each example's images along the channels and call the ONNX or .pt2 file directly")
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h))
                out.append(np.asarray(im, dtype=np.float32).reshape(h, w, c).transpose(2, 0, 1) / 255)
        except Exception as e:
            raise DataError(f"{p}: unreadable image ({type(e).__name__}: {e})") from None
    return np.stack(out)


def logits(images: np.ndarray, export_dir: Path, engine: str, model_uri: str | None = None, ctx=None) -> np.ndarray:
    if engine == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"image": images})[0]
    if engine == "pt2":
        import torch

        from engine.export import load_pt2

        with torch.inference_mode():
            return load_pt2(export_dir / "model.pt2")(torch.from_numpy(images)).numpy()
    if engine == "mlflow":  # from the context's store: the project's, unless MLFLOW_TRACKING_URI names another
        from tasks.tracking import fluent

        with fluent(ctx) as mlflow:
            return np.asarray(mlflow.pyfunc.load_model(model_uri).predict(images))
    raise KDError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")


def predict(paths: list[str], export_dir: Path, engine: str = "onnx", model_uri: str | None = None,
            ctx=None) -> list[dict]:
    if not (export_dir / "labels.json").exists():
        raise KDError(f"{export_dir}: no exported student (labels.json); run `takd export` first")
    labels = json.loads((export_dir / "labels.json").read_text())
    out = logits(load_images(paths, export_dir), export_dir, engine, model_uri, ctx)
    probs = np.exp(out - out.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return [{"image": p, "class": labels[str(int(row.argmax()))], "probability": round(float(row.max()), 4)}
            for p, row in zip(paths, probs)]
