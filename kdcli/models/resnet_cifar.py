"""CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", section 4.2).

6n+2 layers: a 3x3 conv with 16 channels, three stages of n basic blocks with 16, 32 and 64
channels (the first block of stages 2 and 3 halves the spatial size), global average pooling
and a linear classifier. Shortcuts are option A: identity, with a strided slice and zero
padding of the channels where the shape changes, so the shortcuts add no parameters
(ResNet-20 has 0.27 M parameters, ResNet-56 0.85 M). Module names follow the usual layout:
``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ZeroPadShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.in_planes = width
        self.layer1 = self._stage(width, n, 1)
        self.layer2 = self._stage(2 * width, n, 2)
        self.layer3 = self._stage(4 * width, n, 2)
        self.linear = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _factory(depth: int):
    def build(input_shape=(3, 32, 32), num_classes: int = 10, width: int = 16) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, in_channels=input_shape[0], width=width)

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts)."
    return build


resnet20 = _factory(20)
resnet32 = _factory(32)
resnet44 = _factory(44)
resnet56 = _factory(56)
