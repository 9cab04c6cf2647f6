"""A training phase's settings (a recipe's ``train:``), read by :func:`kdcli.train.loop.fit`. Torch-free."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainSpec(BaseModel):
    """One training phase (a recipe's ``train:``): teacher training, distillation per DKDP step,
    or final fine-tuning. Read by :func:`fit`."""

    # allow_inf_nan=False: an inf or nan learning rate, decay or clip trains nothing
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(10, ge=0, le=10_000)
    lr: float = Field(0.05, gt=0, le=10)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["cosine", "step", "constant", "onecycle"] = "cosine"
    warmup_epochs: int = Field(0, ge=0, le=10_000)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(5.0, gt=0, le=1e6)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # auto: channels-last memory on CUDA for a network with 2-D convolutions (tensor cores read
    # NHWC); on the CPU the default layout. on: wherever there are convolutions. off: never.
    channels_last: Literal["auto", "on", "off"] = "auto"
