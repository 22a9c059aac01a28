"""`tv:<name>`: any torchvision classifier, adapted to the data set's channels and classes."""
from __future__ import annotations

import torch
from torch import nn

from models.features import stage_ends
from models.registry import UnknownModelError, register


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    setattr(parent, child_name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, child.groups, child.bias is not None))
                return


@register("tv:", prefix=True)
def torchvision_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision  # here, not at the top: importing it costs a second per process (torch._dynamo)

    tv_name = name[len("tv:"):]
    if tv_name not in torchvision.models.list_models(module=torchvision.models):
        raise UnknownModelError(f"unknown torchvision classifier {tv_name!r} in model {name!r}")
    model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    _adapt_first_conv(model, in_channels)
    # Feature losses pair stages by spatial size; a probe finds where each size ends.
    try:
        model.feature_names = stage_ends(model, torch.zeros(2, in_channels, image_size, image_size))
    except RuntimeError:  # too small an image for this network: explained where the model first runs
        model.feature_names = []
    return model
