"""Small built-in architectures: MLP, LeNet-5, the 3-conv + 2-linear CNN, and a CIFAR VGG."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def _flat_size(features: nn.Module, input_shape: Sequence[int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).flatten(1).shape[1])


class MLP(nn.Module):
    """Fully connected classifier: flatten, hidden Linear+ReLU(+Dropout) layers, Linear head.

    Hinton et al. 2015 use 2x1200 (teacher, dropout) and 2x800 (student) nets on MNIST.
    """

    def __init__(self, input_shape, num_classes: int, hidden: Sequence[int] = (256, 256),
                 dropout: float = 0.0, input_dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=False)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling; 28x28 inputs are padded to 32x32."""

    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        c, h, _ = input_shape
        pad = 2 if h == 28 else 0
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        n = _flat_size(self.features, input_shape)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(n, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN3(nn.Module):
    """The small CNN of 3 conv + 2 linear layers: three conv-BN-ReLU-maxpool blocks, a hidden
    Linear layer and the head. ``widths`` sets the conv channels, ``hidden`` the Linear width."""

    def __init__(self, input_shape, num_classes: int, widths: Sequence[int] = (32, 64, 128),
                 hidden: int = 256, dropout: float = 0.0, batchnorm: bool = True):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"cnn3 needs exactly 3 conv widths, got {list(widths)}")
        c = input_shape[0]
        for i, w in enumerate(widths, start=1):
            block = [nn.Conv2d(c, w, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                block.append(nn.BatchNorm2d(w))
            block += [nn.ReLU(), nn.MaxPool2d(2)]
            setattr(self, f"conv{i}", nn.Sequential(*block))
            c = w
        feats = nn.Sequential(self.conv1, self.conv2, self.conv3)
        n = _flat_size(feats, input_shape)
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(),
                                 *( [nn.Dropout(dropout)] if dropout > 0 else []))
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.conv3(self.conv2(self.conv1(x)))))


VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-style CIFAR net (Simonyan & Zisserman 2015, with BatchNorm): 3x3 conv-BN-ReLU
    blocks, max pooling, one Linear head. ``width`` scales every conv's channel count."""

    def __init__(self, input_shape, num_classes: int, config: str = "vgg11", width: float = 1.0):
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ValueError(f"vgg config must be one of {sorted(VGG_CONFIGS)}, got {config!r}")
        layers: list[nn.Module] = []
        c = input_shape[0]
        size = input_shape[1]
        for v in VGG_CONFIGS[config]:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                w = max(1, int(round(v * width)))
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def mlp(input_shape, num_classes: int, **kw) -> MLP:
    return MLP(input_shape, num_classes, **kw)


def lenet5(input_shape, num_classes: int) -> LeNet5:
    return LeNet5(input_shape, num_classes)


def cnn3(input_shape, num_classes: int, **kw) -> CNN3:
    return CNN3(input_shape, num_classes, **kw)


def vgg(input_shape, num_classes: int, **kw) -> VGG:
    return VGG(input_shape, num_classes, **kw)
