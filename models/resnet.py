"""CIFAR ResNets (He et al. 2016): basic blocks, stages of 16/32/64 channels, depth 6n+2."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import register

DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        # Option A shortcut (parameter-free), as in the paper's CIFAR models.
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = x[:, :, :: self.stride, :: self.stride]
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self.feature_names = ["layer1", "layer2", "layer3"]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register(*(f"resnet-{d}" for d in DEPTHS))
def cifar_resnet(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return CifarResNet(int(name.split("-")[1]), in_channels, num_classes)
