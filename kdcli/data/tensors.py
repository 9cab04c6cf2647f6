"""One split of a data set in memory, as the readers (:mod:`kdcli.data.sources`) produce it and
the loader (:mod:`kdcli.data.loader`) serves it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TensorData:
    """One split in memory: ``x`` uint8 or float32 ``[N, C, H, W]`` / ``[N, D]``, ``y`` int64 ``[N]``."""

    x: torch.Tensor
    y: torch.Tensor
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    streamed = False  # see kdcli.data.stream.StreamData, the split read sample by sample

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one input: ``(C, H, W)`` or ``(D,)``."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        """The stored inputs' dtype (uint8 images, else float32)."""
        return self.x.dtype

    def subset(self, idx: torch.Tensor) -> "TensorData":
        """The rows ``idx`` (int64) as a new split."""
        return TensorData(self.x[idx], self.y[idx])

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` on ``device``; a copy on an accelerator is made once and kept."""
        if device.type == "cpu":
            return self.x, self.y
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.x.to(device), self.y.to(device))
        return self._on_device[key]
