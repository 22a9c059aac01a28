"""Size and cost of a model: parameters, bytes, FLOPs per image (torch.utils.flop_counter)."""
from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.registry import TRACE_LOCK


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def flops_per_image(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Forward FLOPs for one image (a multiply-add counts as 2)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with TRACE_LOCK, FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def train_flops_per_image(model: nn.Module, input_shape: tuple[int, int, int], batch: int = 4) -> int:
    """Forward plus backward FLOPs of one training step, per image (no optimizer step).
    Counted on a copy: a training-mode forward would move the model's BatchNorm statistics."""
    copy = deepcopy(model).train()
    device = next(copy.parameters()).device
    with TRACE_LOCK, FlopCounterMode(display=False) as counter:
        copy(torch.randn(batch, *input_shape, device=device)).sum().backward()
    return int(counter.get_total_flops()) // batch


def profile(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, int]:
    return {"params": count_parameters(model), "size_bytes": size_bytes(model),
            "flops": flops_per_image(model, input_shape)}
