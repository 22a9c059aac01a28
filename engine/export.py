"""The student as shipped: a torch.export program (`.pt2`) and an ONNX file that take images and return logits,
each checked by loading it back, running it and comparing its outputs with PyTorch's.

TorchScript (`.ts`), which this wrote before, is deprecated upstream in favour of torch.export; it is no longer
written (a TorchScript teacher is still read: engine.teacher_import)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from engine.atomic import atomic_path
from models.registry import TRACE_LOCK

MAX_BATCH = 65_536


class Deployable(nn.Module):
    """Float images in [0, 1], [N, C, H, W]: normalised inside, so a caller needs no statistics."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def to_pt2(model: nn.Module, example: torch.Tensor, path) -> None:
    """torch.export.export in inference mode, with a dynamic batch dimension, saved by torch.export.save: load it
    with `torch.export.load("model.pt2").module()`."""
    with TRACE_LOCK:
        program = torch.export.export(model.eval(), (example,), dynamic_shapes={"image": {0: _batch_dim()}})
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.export.save(program, f)


def to_onnx(model: nn.Module, example: torch.Tensor, path) -> None:
    """torch.onnx.export with dynamo=True: the torch.export-based exporter, the one torch recommends (the
    TorchScript-based one is deprecated), with a dynamic batch dimension."""
    with atomic_path(path) as tmp, TRACE_LOCK:
        program = torch.onnx.export(model.eval(), (example,), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes={"image": {0: _batch_dim()}}, dynamo=True, verbose=False)
        program.save(str(tmp))


def load_pt2(path) -> nn.Module:
    """A program this project exported (engine.export.to_pt2), as a module. Only for files we wrote:
    torch.export.load is not a weights-only loader (engine.teacher_import vets a user's `.pt2` first)."""
    with open(path, "rb") as f:
        return torch.export.load(f).module()


@torch.no_grad()
def pt2_max_abs_diff(path, model: nn.Module, images: torch.Tensor) -> float:
    return (load_pt2(path)(images) - model.eval()(images)).abs().max().item()


@torch.no_grad()
def onnx_max_abs_diff(path, model: nn.Module, images: torch.Tensor) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["logits"], {"image": images.numpy()})[0]
    return (torch.from_numpy(out) - model.eval()(images)).abs().max().item()
