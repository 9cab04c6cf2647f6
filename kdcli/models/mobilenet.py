"""MobileNetV2 of Sandler et al. 2018 ("MobileNetV2: Inverted Residuals and Linear Bottlenecks"),
laid out as torchvision defines it, for any input size, optionally with squeeze-and-excitation.

A 3x3 stride-2 stem conv (32 channels), 17 inverted residual blocks (table 2 of the paper: a 1x1
expansion conv by t, a 3x3 depthwise conv, a linear 1x1 projection; residual when stride 1 and
in == out), a 1x1 conv to 1280 channels, global average pooling, dropout and the classifier.
Activations are ReLU6; every channel count is ``width_mult`` times the paper's, rounded to a
multiple of 8 (the last conv never narrows below 1280).

For small inputs (H and W <= 64, e.g. CIFAR 32x32) the stem and the first stride-2 stage keep
stride 1 (the usual CIFAR variant): otherwise a 32x32 input is 1x1 by the last stages.

``se=True`` puts the squeeze-and-excitation block of MobileNetV3 (Howard et al. 2019, after Hu
et al. 2018) in every inverted residual after the depthwise conv: global pool, 1x1 reduce to a
quarter, ReLU, 1x1 expand, hardsigmoid, channel-wise multiply.

Module and state-dict names are torchvision's (``features.0.0``, ``features.2.conv.1.0``,
``classifier.1``), so at ``width_mult=1``, a large input and ``se=False`` its weights load as they are.
In torch-pruning's graph a depthwise conv couples its input and output channels, so one group
of an inverted residual holds the expansion conv's filters, its BN, the depthwise conv, its BN,
the SE block's outer channels and the projection's input slices, removed together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.models.resnet import is_small_input

# t (expansion), c (output channels), n (blocks), s (stride of the first block): table 2
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1)]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """``v`` rounded to the nearest multiple of ``divisor`` without going more than 10 % below
    it (the rounding of the reference MobileNet implementations)."""
    min_value = min_value or divisor
    new = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn_act(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias: the BN shifts) + BN + ReLU6, torchvision's Conv2dNormActivation layout."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class SqueezeExcitation(nn.Module):
    """Channel attention of MobileNetV3: scale = hardsigmoid(fc2(relu(fc1(mean over H, W)))), x * scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when t = 1), 3x3 depthwise conv (groups = channels), optional SE,
    linear 1x1 projection + BN (no activation: the bottleneck is linear); residual when the
    stride is 1 and the channel counts match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, se: bool = False):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(inp, hidden, 1))
        layers.append(conv_bn_act(hidden, hidden, 3, stride, groups=hidden))
        if se:
            layers.append(SqueezeExcitation(hidden, make_divisible(hidden // 4, 8)))
        layers += [nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision's layout); ``small_input`` keeps stride 1 in the stem and in the
    first stride-2 stage."""

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0, se: bool = False,
                 small_input: bool = False, dropout: float = 0.2):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"mobilenet_v2 width_mult must be positive, got {width_mult}")
        cin = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn_act(in_channels, cin, 3, 1 if small_input else 2)]
        first_stride2 = True
        for t, c, n, s in SETTINGS:
            cout = make_divisible(c * width_mult)
            if s == 2 and first_stride2:
                first_stride2 = False
                s = 1 if small_input else 2
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, se=se))
                cin = cout
        features.append(conv_bn_act(cin, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def mobilenet_v2(input_shape=(3, 224, 224), num_classes: int = 1000, width_mult: float = 1.0, se: bool = False,
                 small_input: bool | None = None, dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 (Sandler et al. 2018), channels times ``width_mult`` (3.50 M parameters at 1.0
    with 1000 classes); ``se``: MobileNetV3's squeeze-and-excitation in every block;
    ``small_input``: the CIFAR strides, by default when H and W are at most 64."""
    small = is_small_input(input_shape) if small_input is None else bool(small_input)
    return MobileNetV2(num_classes, in_channels=input_shape[0], width_mult=width_mult, se=se, small_input=small,
                       dropout=dropout)
