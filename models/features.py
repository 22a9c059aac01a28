"""Named intermediate features, via torchvision's FX feature extractor.

The plain `model(x)` path is untouched; feature-based and relation-based losses wrap the
model once with `with_features` and get `(logits, {name: tensor})`.
"""
from __future__ import annotations

import torch
from torch import nn


def get_graph_node_names(model: nn.Module):
    # torchvision is imported where it is used: importing it costs every process a second (torch._dynamo).
    from torchvision.models.feature_extraction import get_graph_node_names as names

    return names(model)


def feature_names(model: nn.Module) -> list[str]:
    """The model's stages; for a model that names none, every graph node but the output."""
    names = getattr(model, "feature_names", None)
    return list(names) if names else get_graph_node_names(model)[1][:-1]


def _blocks(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The root's children, and the children of every nn.Sequential among them, recursively: the
    building blocks, not the layers inside a block."""
    out = []
    for name, child in module.named_children():
        out.append((prefix + name, child))
        if isinstance(child, nn.Sequential):
            out += _blocks(child, f"{prefix}{name}.")
    return out


def stage_ends(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The block that finishes last at each spatial size, in forward order: the ends of a CNN's
    stages whatever its code calls them (torchvision's resnet18: relu, layer1 .. layer3, avgpool)."""
    finished: dict[str, tuple[int, ...]] = {}  # insertion order = order of (last) completion

    def hook(name: str):
        def record(_module, _inputs, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                finished.pop(name, None)
                finished[name] = tuple(out.shape[-2:])
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in _blocks(model)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(sample)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    last_at: dict[tuple[int, ...], str] = {}
    for name, size in finished.items():
        last_at[size] = name
    order = list(finished)
    return sorted(last_at.values(), key=order.index)


class WithFeatures(nn.Module):
    """Returns logits and the requested features from one forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        output = get_graph_node_names(model)[1][-1]
        self.output = output
        from torchvision.models.feature_extraction import create_feature_extractor

        self.body = create_feature_extractor(model, return_nodes=[*names, output])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.body(x)
        logits = out.pop(self.output)
        return logits, out


def with_features(model: nn.Module, names: list[str] | None = None) -> WithFeatures:
    return WithFeatures(model, names if names is not None else feature_names(model))
