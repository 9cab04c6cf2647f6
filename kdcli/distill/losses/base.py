"""What every loss term shares: the term interface, layer pairing, shape matching, granularity.

A term is an ``nn.Module`` (its adapters are its parameters) with two halves, so that the teacher
half can be cached per sample:

- ``targets(t_logits, t_feats) -> {key: tensor (N, ...)}``: what the term needs from the teacher,
  computed without gradients (the teacher's logits, a feature, an attention map, FSP matrices);
- ``forward(s_logits, s_feats, targets, y) -> scalar``: the term's value for the student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.errors import InputError


TERMS: dict[str, type["Term"]] = {}  # recipe kind -> its term class, filled by subclassing


class Term(nn.Module):
    """One loss term of the distillation objective (unweighted; the Distiller applies ``weight``).

    A subclass declares the recipe ``kind`` it implements (``class KDTerm(Term, kind="kd")``) and
    is registered in :data:`TERMS` by it; its spec is the class of that kind in
    :mod:`kdcli.config.losses`."""

    kind: str = ""

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            if kind in TERMS:
                raise TypeError(f"loss kind {kind!r} is implemented twice ({TERMS[kind].__name__}, {cls.__name__})")
            cls.kind = kind
            TERMS[kind] = cls

    def __init__(self, name: str, weight: float):
        super().__init__()
        self.name, self.weight = name, float(weight)
        self.teacher_layers: list[str] = []
        self.student_layers: list[str] = []

    def targets(self, t_logits: torch.Tensor, t_feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample teacher quantities this term needs (first dimension = batch)."""
        return {}

    def forward(self, s_logits, s_feats, targets, y) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class Layers:
    """The resolved layers of a feature term: paths and per-sample output shapes (no batch dim)."""

    teacher: list[str]
    student: list[str]
    t_shapes: dict[str, torch.Size]
    s_shapes: dict[str, torch.Size]
    where: str  # the recipe field, for error messages, e.g. "distill.losses[2]"


def nearest_teacher(nt: int, ns: int) -> list[int]:
    """For each of ``ns`` student layers, the teacher layer (of ``nt``) at the nearest relative
    depth: the diagonal when the counts match; a single student layer pairs with the last."""
    if ns == nt:
        return list(range(ns))
    if ns == 1:
        return [nt - 1]
    return [int(math.floor(j * (nt - 1) / (ns - 1) + 0.5)) for j in range(ns)]


def pairs(layers: Layers) -> list[tuple[str, str]]:
    """``(teacher_path, student_path)`` pairs of a one-to-one term (hint, AT, AB): see
    :func:`nearest_teacher`."""
    idx = nearest_teacher(len(layers.teacher), len(layers.student))
    return [(layers.teacher[i], s) for i, s in zip(idx, layers.student)]


def to_vector(f: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C) by global average pooling; (N, C) unchanged."""
    return f.flatten(2).mean(2) if f.dim() > 2 else f


def pool_to(f: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Adaptive average pooling of (N, C, H, W) features to ``size`` (no-op when equal)."""
    if tuple(f.shape[2:]) == tuple(size):
        return f
    return F.adaptive_avg_pool2d(f, size)


def smaller(a: torch.Size | tuple, b: torch.Size | tuple) -> tuple[int, ...]:
    """The elementwise smaller of two spatial sizes."""
    return tuple(min(x, y) for x, y in zip(a, b))


def check_rank(shape: torch.Size, path: str, where: str, ranks=(1, 3)) -> None:
    """Features must be (C,) or (C, H, W) per sample; others cannot be matched automatically."""
    if len(shape) not in ranks:
        want = " or ".join({1: "(N, C)", 3: "(N, C, H, W)"}[r] for r in ranks)
        raise InputError(f"{where}: layer {path!r} outputs shape (N, {', '.join(map(str, shape))}); "
                         f"this loss needs {want} features")


def per_channel_loss(fn, pred: torch.Tensor, target: torch.Tensor,
                     critical: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel mean of ``fn(pred, target)`` (elementwise, shape (N, C, ...)) over the batch and
    positions -> (C,). Channels flagged ``critical`` are compared coarsely: both sides are pooled
    to 1x1 first, so only the channel's mean activation must match, not its spatial layout."""
    per = fn(pred, target).float()
    out = per.transpose(0, 1).flatten(1).mean(1)
    if critical is not None and pred.dim() > 2 and bool(critical.any()):
        coarse = fn(to_vector(pred)[..., None, None], to_vector(target)[..., None, None]).float()
        out = torch.where(critical, coarse.transpose(0, 1).flatten(1).mean(1), out)
    return out


class ChannelWeights(nn.Module):
    """Granularity of one teacher layer: per-channel ``weight`` (C,) and ``critical`` mask (C,),
    as buffers so they follow the Distiller to its device. Uniform and no critical channel when
    the granularity map has no entry for the layer."""

    def __init__(self, gmap, path: str, channels: int, where: str):
        super().__init__()
        entry = gmap.layers.get(path) if gmap is not None else None
        if entry is not None and len(entry.weight) != channels:
            raise InputError(f"{where}: granularity map layer {path!r} has {len(entry.weight)} features, "
                             f"the teacher's {path!r} has {channels} channels")
        w = torch.tensor(entry.weight, dtype=torch.float32) if entry else torch.ones(channels)
        c = torch.tensor(entry.critical, dtype=torch.bool) if entry else torch.zeros(channels, dtype=torch.bool)
        self.register_buffer("weight", w, persistent=False)
        self.register_buffer("critical", c, persistent=False)
