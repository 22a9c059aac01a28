"""What every training and evaluation needs: the prepared splits on the device, and models built, loaded and saved
for them. Plain PyTorch: it knows files, not stages."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from engine.atomic import load_torch, save_json, save_torch
from engine.config import DataConfig
from engine.data import Splits
from engine.feed import DeviceSet
from engine.device import resolve_device
from engine.errors import CheckpointError, KDError
from engine.fingerprint import model_fingerprint
from engine.placement import loader_workers, placement, resident
from engine.store import SPLITS
from engine.teacher_import import PROGRAM_FILES, load_program, save_program
from models import build_model, views
from models.profile import profile

MODEL_FILE, MODEL_META, HISTORY_FILE = "model.pt", "model.json", "history.json"
PREDICTIONS, PREDICTIONS_FILE = "predictions", "predictions.pt"  # a teacher known only by its outputs: no model


def load_splits_file(prepared: Path) -> Splits:
    """The splits the prepare-data stage stored in its folder, images left on disk."""
    return Splits.read(prepared)


class Workspace:
    """The prepared data on one device, plus helpers to build and load models for it. `data` (its storage, memory
    budget and loader workers) says which splits are read into memory and which stream from disk (engine/placement.py);
    a split that streams is verified against the manifest first."""

    def __init__(self, prepared: Path, device: str, data: DataConfig | None = None):
        self.data = data = data or DataConfig()
        self.device = resolve_device(device)
        self.splits = load_splits_file(prepared)
        self.mean, self.std = self.splits.mean_std()
        self.placement = placement(prepared, data, self.device)
        workers = loader_workers(data, self.device)
        self.train, self.val, self.test = (
            DeviceSet(getattr(self.splits, s), self.mean, self.std, self.device, stream=self.placement[s] == "disk",
                      workers=workers) for s in SPLITS)
        self.fingerprint = self.splits.fingerprint()

    def close(self) -> None:
        """Ends the loader workers of streamed splits."""
        for part in (self.train, self.val, self.test):
            part.close()

    def keeps_resident(self, nbytes: int) -> bool:
        """Whether a cache of `nbytes` is read into memory, or left on disk and read by row (engine/placement.py)."""
        taken = sum(getattr(self, s).x.numel() for s in SPLITS if self.placement[s] == "memory")
        return resident(self.data, self.device, nbytes, taken)

    def build(self, arch: str, seed: int | None = None, input: str | None = None) -> nn.Module:
        """The model for these splits; with `input`, one that reads that view of them (models/views.py)."""
        c, h, _ = self.splits.input_shape
        view = None
        if input:
            try:
                view, c = views.view(input, self.splits.modalities, c, h, self.splits.name)
            except ValueError as e:
                raise KDError(f"{arch}: {e}") from None
        model = build_model(arch, c, self.splits.num_classes, h, seed)
        if view is not None:
            model = views.Viewed(view, model, input)
            model.arch = arch
        return model.to(self.device, memory_format=torch.channels_last)

    def load_state(self, model: nn.Module, state: dict, source: str) -> nn.Module:
        """Strict load; a mismatch names the file, the architecture and the differing tensors."""
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        extra = [k for k in state if k not in own]
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if missing or extra or shapes:
            c, h, w = self.splits.input_shape
            what = (f"{model.arch} for {self.splits.num_classes} classes and {c}x{h}x{w} inputs")
            detail = "; ".join(shapes[:3] + [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {extra[:3]}"] * bool(extra))
            raise CheckpointError(f"{source}: checkpoint does not fit {what}: {detail}")
        model.load_state_dict(state)
        return model

    def load_model_dir(self, model_dir: Path) -> nn.Module:
        meta = read_meta(model_dir)
        if meta["arch"] == PREDICTIONS:
            raise KDError(f"{model_dir}: the teacher is known only by its predictions ({meta['predictions']['file']}); "
                          "there is no model to run")
        if meta["arch"] in PROGRAM_FILES:  # an imported torch.export or TorchScript teacher, kept as it came
            return load_program(meta["arch"], model_dir / PROGRAM_FILES[meta["arch"]], self.device)
        model = self.build(meta["arch"], input=meta.get("input"))
        return self.load_state(model, load_torch(model_dir / MODEL_FILE, self.device), str(model_dir / MODEL_FILE))

    def load_guide(self, model_dir: Path) -> nn.Module | None:
        """The model a distillation learns from; None for a teacher known only by its predictions."""
        return None if read_meta(model_dir)["arch"] == PREDICTIONS else self.load_model_dir(model_dir)

    def data_meta(self) -> dict:
        return {"classes": self.splits.classes, "class_to_idx": {c: i for i, c in enumerate(self.splits.classes)},
                "input_shape": list(self.splits.input_shape), "mean": self.mean, "std": self.std,
                "data": self.splits.name, "data_fingerprint": self.fingerprint,
                "data_placement": self.placement}

    def save_predictions(self, out_dir: Path, logits: torch.Tensor, meta: dict) -> dict:
        """A teacher known only by its outputs: its logits for the train split, in order, and its meta."""
        save_torch(logits, out_dir / PREDICTIONS_FILE)
        save_json([], out_dir / HISTORY_FILE)
        fingerprint = hashlib.sha256(logits.numpy().tobytes()).hexdigest()[:16]
        meta = {**meta, "arch": PREDICTIONS, **self.data_meta(), "model_fingerprint": fingerprint}
        save_json(meta, out_dir / MODEL_META)
        return meta

    def save_model(self, out_dir: Path, model: nn.Module, meta: dict, history: list[dict]) -> dict:
        if model.arch in PROGRAM_FILES:
            save_program(model, out_dir / PROGRAM_FILES[model.arch])
        save_torch(model.state_dict(), out_dir / MODEL_FILE)
        save_json(history, out_dir / HISTORY_FILE)
        meta = {**meta, "arch": model.arch, **({"input": model.input} if isinstance(model, views.Viewed) else {}),
                **self.data_meta(), "model_fingerprint": model_fingerprint(model),
                **profile(model, self.splits.input_shape)}
        save_json(meta, out_dir / MODEL_META)
        return meta


def read_meta(model_dir: Path) -> dict:
    path = model_dir / MODEL_META
    if not path.exists():
        raise KDError(f"{path}: model not found; run the stage that trains it first")
    return json.loads(path.read_text())
