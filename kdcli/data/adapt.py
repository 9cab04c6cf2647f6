"""``data.input``: make a source's inputs fit the model (size and channels), once, at load time.

A LeNet-5 trained on MNIST padded to 32x32 reads 28x28 MNIST with ``{size: [32, 32], fit: pad}``;
a colour model reads grey images with ``{channels: 3}``. The change is made on the stored tensors
(uint8 stays uint8, so CIFAR-sized data stays small), in chunks, for every split alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcli.config.data import InputAdapt
from kdcli.data.tensors import TensorData
from kdcli.errors import DataError

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, what PIL's convert("L") uses
_CHUNK = 4096


def adapt_inputs(data: TensorData | None, spec: InputAdapt, what: str) -> TensorData | None:
    """``data`` with its inputs resized or padded to ``spec.size`` and its channels replicated or
    reduced to ``spec.channels``; unchanged when ``spec`` asks for nothing."""
    if data is None or not spec.active:
        return data
    x = data.x
    adapted_shape(tuple(x.shape), spec, what)
    chunks = [_adapt_chunk(x[i:i + _CHUNK], spec) for i in range(0, len(x), _CHUNK)]
    out = torch.cat(chunks) if chunks else _adapt_chunk(x[:0], spec)
    return TensorData(out, data.y)


def adapted_shape(shape: tuple[int, ...], spec: InputAdapt, what: str) -> tuple[int, ...]:
    """The shape ``[N, C, H, W]`` becomes under ``spec`` (unchanged when inactive); DataError when
    ``spec`` cannot apply to it."""
    if not spec.active:
        return tuple(shape)
    if len(shape) != 4:
        raise DataError(f"data.input: needs image data [N, C, H, W], but {what} has shape {list(shape)}")
    n, c, h, w = shape
    if spec.channels is not None and spec.channels != c and c != 1 and not (c == 3 and spec.channels == 1):
        raise DataError(f"data.input.channels: {what} has {c} channels; {spec.channels} can be made only from "
                        "1 (replicated) or from 3 (to 1, luminance)")
    return (n, spec.channels or c, *(spec.size or (h, w)))


def adapt_sample(x: torch.Tensor, spec: InputAdapt) -> torch.Tensor:
    """One input ``[C, H, W]`` adapted as :func:`adapt_inputs` adapts a split (the same pixels)."""
    return _adapt_chunk(x[None], spec)[0] if spec.active else x


def _adapt_chunk(x: torch.Tensor, spec: InputAdapt) -> torch.Tensor:
    dtype = x.dtype
    y = x.float()
    if spec.channels is not None and spec.channels != y.shape[1]:
        if y.shape[1] == 1:
            y = y.expand(-1, spec.channels, -1, -1)
        else:  # 3 -> 1
            w = torch.tensor(_LUMA, dtype=y.dtype).view(1, 3, 1, 1)
            y = (y * w).sum(1, keepdim=True)
    if spec.size is not None and tuple(y.shape[2:]) != tuple(spec.size):
        y = _resize(y, spec.size) if spec.fit == "resize" else _pad_or_crop(y, spec.size)
    if dtype == torch.uint8:
        return y.round().clamp(0, 255).to(torch.uint8)
    return y.to(dtype).contiguous()


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros((0, x.shape[1], *size))
    # antialias when shrinking, as PIL does, so that a 64x64 -> 32x32 resize does not alias
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def _pad_or_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero padding to ``size`` around the centre (the extra pixel, if odd, goes right/bottom);
    a side larger than ``size`` is centre-cropped instead."""
    h, w = x.shape[2:]
    th, tw = size
    top, left = (th - h) // 2, (tw - w) // 2
    # F.pad with negative amounts crops, so one call handles both directions
    return F.pad(x, (left, tw - w - left, top, th - h - top))
