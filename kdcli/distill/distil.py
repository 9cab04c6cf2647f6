"""``distil()``: one distillation of a teacher into a student, with no recipe. ``kdcli compress``
calls it for every DKDP step and for the final distillation; a script or notebook can too::

    from kdcli.config import TrainSpec
    from kdcli.distill.distil import distil

    result = distil(teacher, student, [{"kind": "kd", "temperature": 4, "weight": 0.9},
                                       {"kind": "ce", "weight": 0.1}],
                    data, TrainSpec(epochs=3, lr=0.02))
    result.history[-1]["val_accuracy"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from pydantic import TypeAdapter
from torch import nn

from kdcli.config.losses import LossSpec
from kdcli.config.train import TrainSpec
from kdcli.data.loader import DataBundle
from kdcli.distill.distiller import Distiller, TeacherCache
from kdcli.train.loop import fit, tensor_batches

_LOSS = TypeAdapter(LossSpec)


@dataclass
class DistilResult:
    """What one distillation gives back besides the trained student."""

    history: list[dict]             # fit()'s per-epoch metrics (loss, parts, val_accuracy)
    lambda_report: dict | None      # learned VID λ (Distiller.lambda_report), when a VID term has one
    cache: TeacherCache | None      # the teacher cache, to pass to the next call with the same teacher


def distil(teacher: nn.Module, student: nn.Module, losses: Sequence, data: DataBundle, train: TrainSpec, *,
           device: torch.device | str = "cpu", val: list | None = None, granularity=None, seed: int = 0,
           cache_teacher: bool = True, cache: TeacherCache | None = None,
           progress: Callable[[dict], None] | None = None) -> DistilResult:
    """Distil the frozen ``teacher`` into ``student`` (trained in place) on ``data``'s training split
    for ``train.epochs`` epochs, with the weighted sum of ``losses`` (``distill.losses`` entries:
    spec objects or plain dicts such as ``{"kind": "kd", "temperature": 4}``).

    ``val``: validation batches (default: ``data``'s validation split), evaluated after each epoch.
    ``granularity``: a :class:`kdcli.analyze.granularity.GranularityMap` for feature terms.
    ``cache_teacher``: keep the teacher's targets per training sample when the transfer set is not
    augmented (the teacher then runs once per sample); ``cache``, from an earlier result, carries
    them over to the next call with the same teacher, losses and split. The cache is filled in
    sample order before training, so its values do not depend on the order batches arrive in.
    Everything random is seeded from ``seed``."""
    device = torch.device(device)
    specs = [_LOSS.validate_python(s) if isinstance(s, dict) else s for s in losses]
    if val is None:
        val = tensor_batches(*data.eval_tensors("val", device))
    torch.manual_seed(seed)
    example = torch.zeros(2, *data.input_shape, device=device)
    distiller = Distiller(teacher, student, specs, example, granularity=granularity).to(device)
    loader = data.loader("train", train=True, device=device, seed=seed)
    if cache_teacher and not loader.augmented:
        cache = distiller.enable_teacher_cache(len(data.train.y), cache=cache)
        distiller.fill_teacher_cache(data.loader("train", train=False, device=device, rank=0, world_size=1))
    else:
        cache = None
    res = fit(student, loader, train, objective=distiller, extra_modules=[distiller], val_batches=val, device=device,
              progress=progress, before_epoch=distiller.set_epoch)
    return DistilResult(res.history, distiller.lambda_report(), cache)
