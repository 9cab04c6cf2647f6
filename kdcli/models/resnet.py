"""ResNet-18 of He et al. 2016 ("Deep Residual Learning for Image Recognition", table 1), laid
out as torchvision defines it, for any input size.

Four stages of two basic blocks (two 3x3 conv-BN pairs) at 64, 128, 256 and 512 channels (times
``width``); the first block of stages 2-4 halves the spatial size. Shortcuts are identity, or a
strided 1x1 conv + BN where the shape changes (option B): unlike the zero-padding shortcut of the
CIFAR ResNets, torch-pruning understands these, so the residual channel groups stay prunable.

The stem follows the input: for large inputs (224x224) the 7x7 stride-2 conv and 3x3 stride-2
max-pool of the paper; for small ones (H and W <= 64, e.g. CIFAR 32x32) a 3x3 stride-1 conv and
no pooling, the usual CIFAR variant, which would otherwise shrink 32x32 to 8x8 before the first
stage. Module and state-dict names are torchvision's (``conv1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``fc``), so at ``width=1`` and a large input its weights load as they are.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SMALL_INPUT = 64  # H and W at most this: the CIFAR stem


def is_small_input(input_shape: Sequence[int]) -> bool:
    """Whether an image input ``(C, H, W)`` takes the small-input (CIFAR) stem."""
    if len(input_shape) != 3:
        raise ValueError(f"expected an image input shape (C, H, W), got {list(input_shape)}")
    return input_shape[1] <= SMALL_INPUT and input_shape[2] <= SMALL_INPUT


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs and a shortcut: identity, or 1x1 conv + BN where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # functional ReLUs: one nn.ReLU module called twice (torchvision's) would be one node in
        # torch-pruning's graph, joining the channels of conv1 and of the residual sum
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with basic blocks (``blocks`` per stage), torchvision's layout; ``small_input``
    picks the 3x3 stride-1 stem without max-pool."""

    def __init__(self, blocks: Sequence[int], num_classes: int, in_channels: int = 3, width: float = 1.0,
                 small_input: bool = False):
        super().__init__()
        if width <= 0:
            raise ValueError(f"resnet width must be positive, got {width}")
        planes = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.in_planes = planes[0]
        self.layer1 = self._stage(planes[0], blocks[0], 1)
        self.layer2 = self._stage(planes[1], blocks[1], 2)
        self.layer3 = self._stage(planes[2], blocks[2], 2)
        self.layer4 = self._stage(planes[3], blocks[3], 2)
        self.fc = nn.Linear(planes[3], num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18(input_shape=(3, 224, 224), num_classes: int = 1000, width: float = 1.0,
             small_input: bool | None = None) -> ResNet:
    """ResNet-18 (He et al. 2016): [2, 2, 2, 2] basic blocks at 64-512 channels times ``width``
    (11.69 M parameters at width 1 with 1000 classes). ``small_input``: the CIFAR stem; by default
    when H and W are at most 64."""
    small = is_small_input(input_shape) if small_input is None else bool(small_input)
    return ResNet([2, 2, 2, 2], num_classes, in_channels=input_shape[0], width=width, small_input=small)
