"""Named intermediate features, via torchvision's FX feature extractor.

The plain `model(x)` path is untouched; feature-based and relation-based losses wrap the
model once with `with_features` and get `(logits, {name: tensor})`.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names


def feature_names(model: nn.Module) -> list[str]:
    names = getattr(model, "feature_names", None)
    return list(names) if names else get_graph_node_names(model)[1]


class WithFeatures(nn.Module):
    """Returns logits and the requested features from one forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        output = get_graph_node_names(model)[1][-1]
        self.output = output
        self.body = create_feature_extractor(model, return_nodes=[*names, output])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.body(x)
        logits = out.pop(self.output)
        return logits, out


def with_features(model: nn.Module, names: list[str] | None = None) -> WithFeatures:
    return WithFeatures(model, names if names is not None else feature_names(model))
