"""The TAKD paper's plain CNN family (3x3 conv + BN + ReLU, 2x2 max-pool), with its widths."""
from __future__ import annotations

import torch
from torch import nn

from models.registry import register

# "P" is a 2x2 max-pool; ints are conv widths. FC hidden sizes follow the pools.
_NARROW = {  # CIFAR-10 widths; used for data sets with fewer than 100 classes
    "plain-2": ([16, "P", 16, "P"], []),
    "plain-4": ([16, 16, "P", 32, 32, "P"], []),
    "plain-6": ([16, 16, "P", 32, 32, "P", 64, 64, "P"], []),
    "plain-8": ([16, 16, "P", 32, 32, "P", 64, 64, "P", 128, 128, "P"], [64]),
    "plain-10": ([32, 32, "P", 64, 64, "P", 128, 128, "P", 256, 256, 256, 256, "P"], [128]),
}
_WIDE = {  # CIFAR-100 widths
    "plain-2": ([32, "P", 32, "P"], []),
    "plain-4": ([32, 32, "P", 64, 64, "P"], []),
    "plain-6": ([32, 32, "P", 64, 64, "P", 128, 128, "P"], []),
    "plain-8": ([32, 32, "P", 64, 64, "P", 128, 128, "P", 256, 256, "P"], [64]),
    "plain-10": ([32, 32, "P", 64, 64, "P", 128, 128, "P", 256, 256, 256, 256, "P"], [512]),
}


# Narrower students for the student-size sweep: plain-2 with its widths scaled so its first conv has k channels.
NARROWER = {f"plain-2-w{k}": ("plain-2", k) for k in (2, 4, 8)}


def _layout(name: str, wide: bool) -> tuple[list, list[int]]:
    family = _WIDE if wide else _NARROW
    if name not in NARROWER:
        return family[name]
    base, k = NARROWER[name]
    layers, hidden = family[base]
    scale = k / layers[0]
    return [x if x == "P" else max(1, round(x * scale)) for x in layers], [max(1, round(h * scale)) for h in hidden]


class PlainCNN(nn.Module):
    def __init__(self, layers: list, hidden: list[int], in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        blocks: list[nn.Module] = []
        channels, size, stage = in_channels, image_size, []
        self.feature_names: list[str] = []
        for item in layers:
            if item == "P":
                stage.append(nn.MaxPool2d(2))
                size //= 2
                blocks.append(nn.Sequential(*stage))
                self.feature_names.append(f"features.{len(blocks) - 1}")
                stage = []
            else:
                stage += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*blocks)
        dims = [channels * size * size, *hidden]
        head: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims, dims[1:]):
            head += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        head.append(nn.Linear(dims[-1], num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register(*_NARROW, *NARROWER)
def plain_cnn(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    layers, hidden = _layout(name, wide=num_classes >= 100)
    if image_size >> layers.count("P") < 1:
        raise ValueError(f"model {name!r} pools {layers.count('P')} times; image size {image_size} is too small")
    return PlainCNN(layers, hidden, in_channels, num_classes, image_size)
