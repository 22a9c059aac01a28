"""The reference: the smallest training loop a person writes by hand over in-memory tensors.

Inputs are normalised once up front (no per-batch work at all), the loss is plain cross
entropy, and each epoch ends with one accuracy pass over the validation tensors, as
every hand-written loop does. No checkpoints, no logging, no progress bar.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def prepare(data, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A DeviceSet's images as normalised float tensors in the trainer's memory format."""
    return data.normalize(data.x).to(device), data.y.to(device)


def bare_fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
             epochs: int, batch_size: int, lr: float = 0.05, seed: int = 0, compile: bool = False) -> float:
    """Trains in place; returns the last validation accuracy."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step = torch.compile(model) if compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    g = torch.Generator().manual_seed(seed)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).to(x.device).split(batch_size):
            with amp:
                loss = F.cross_entropy(step(x[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad(), amp:
            correct = sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x_val.split(1024), y_val.split(1024)))
        acc = (correct / len(y_val)).item()
    return acc
