"""The student as shipped: TorchScript and ONNX files that take images and return logits,
each checked by running it and comparing its outputs with PyTorch's."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from engine.atomic import atomic_path
from models.registry import TRACE_LOCK


class Deployable(nn.Module):
    """Float images in [0, 1], [N, C, H, W]: normalised inside, so a caller needs no statistics."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)


def to_torchscript(model: nn.Module, example: torch.Tensor, path) -> None:
    with warnings.catch_warnings(), TRACE_LOCK:
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; the format still ships
        traced = torch.jit.trace(model.eval(), example)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))


def to_onnx(model: nn.Module, example: torch.Tensor, path) -> None:
    """torch.onnx (the torch.export-based exporter), with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=65_536)
    with warnings.catch_warnings(), atomic_path(path) as tmp, TRACE_LOCK:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (example,), input_names=["image"], output_names=["logits"],
                                    dynamic_shapes={"image": {0: batch}}, dynamo=True, verbose=False)
        program.save(str(tmp))


@torch.no_grad()
def torchscript_max_abs_diff(path, model: nn.Module, images: torch.Tensor) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    return (loaded(images) - model.eval()(images)).abs().max().item()


@torch.no_grad()
def onnx_max_abs_diff(path, model: nn.Module, images: torch.Tensor) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(["logits"], {"image": images.numpy()})[0]
    return (torch.from_numpy(out) - model.eval()(images)).abs().max().item()
