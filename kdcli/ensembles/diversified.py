"""Diversified ensembles: members trained one after another at adaptive granularity.

Member 0 is trained with cross-entropy. Member i > 0 is trained with

    loss_i = CE(z_i, y) + λ · D(f_i, f_{i−1}),

where f are the features of the tapped layers (:mod:`kdcli.distill.taps`; ``auto`` = each stage's
output) of member i and of the frozen member i−1, and D is :func:`diversification_term`:
a granularity-weighted feature-matching term whose *granularity* decides where the members may
differ. Per layer with C features and the granularity map's weights w_c and critical flags
(:mod:`kdcli.analyze.granularity`, from activation-sensitivity analysis),

    D_layer = (1/C) Σ_c w_c · m_c,
    m_c = MSE(f_i,c , f_{i−1},c)                     for a non-critical feature (precise);
    m_c = MSE(pool(f_i,c), pool(f_{i−1},c))         for a critical feature (coarse),

and D is the mean over layers. ``pool`` is global average pooling over positions for maps
[N, C, H, W] (one value per sample and channel), and the batch mean for vectors [N, C] (a
neuron has no positions, so its coarse version is its mean activation over the batch).

The sign is positive: D pulls member i toward its predecessor, and never pushes it away. How it
diversifies: the features that decide the outcome (critical) are constrained only in their
coarse value, i.e. *what* they signal, not in the spatial pattern that produces it, so member
i (from its own seed) must find its own way to the same outcome there; the non-critical ones
are copied precisely, which keeps the members' shared, unimportant structure aligned and
spends their freedom where it matters. Compared with independently trained members, the term
trades raw diversity for members that agree on coarse evidence; :mod:`kdcli.ensembles.diversity`
measures disagreement and CKA so the trade can be checked (``diversity_weight: 0`` gives the
independent ensemble, trained by the same loop with the same budget).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.analyze.granularity import GranularityMap
from kdcli.analyze.sensitivity import activation_statistics, granularity_map
from kdcli.distill.taps import FeatureTaps, auto_layers
from kdcli.errors import InputError
from kdcli.train.loop import fit


def _per_channel(a: torch.Tensor) -> torch.Tensor:
    """[N, C, *S] → [N, C, P] (P = positions, 1 for vectors)."""
    return a.reshape(a.shape[0], a.shape[1], -1)


def layer_term(f_new: torch.Tensor, f_prev: torch.Tensor, weight: torch.Tensor | None = None,
               critical: torch.Tensor | None = None) -> torch.Tensor:
    """D_layer of the module docstring for features [N, C, ...] of both members, ``weight`` [C]
    (ones when None) and ``critical`` [C] bool (none when None). A scalar."""
    if f_new.shape != f_prev.shape:
        raise InputError(f"diversified: member features differ in shape: {list(f_new.shape)} vs {list(f_prev.shape)}")
    a, b = _per_channel(f_new.float()), _per_channel(f_prev.float())
    fine = ((a - b) ** 2).mean(dim=(0, 2))                                  # [C]
    if critical is not None and bool(critical.any()):
        if f_new.dim() > 2:   # maps: one value per sample and channel
            coarse = ((a.mean(2) - b.mean(2)) ** 2).mean(0)
        else:                 # vectors: the neuron's mean activation over the batch
            coarse = (a[..., 0].mean(0) - b[..., 0].mean(0)) ** 2
        fine = torch.where(critical.to(fine.device), coarse, fine)
    if weight is not None:
        fine = fine * weight.to(fine.device, fine.dtype)
    return fine.mean()


def diversification_term(f_new: dict[str, torch.Tensor], f_prev: dict[str, torch.Tensor],
                         granularity: GranularityMap | None = None) -> torch.Tensor:
    """D(f_i, f_{i−1}) of the module docstring: the mean over layers (dict keys, module paths) of
    :func:`layer_term` with the map's weights and critical flags; a layer the map does not list
    (or no map) gets uniform weights and no critical feature."""
    if not f_new:
        raise InputError("diversified: no layers to compare")
    total = 0.0
    for path, a in f_new.items():
        entry = granularity.layers.get(path) if granularity is not None else None
        w = crit = None
        if entry is not None:
            if len(entry.weight) != a.shape[1]:
                raise InputError(f"diversified: granularity map layer {path!r} has {len(entry.weight)} features, "
                                 f"the member's {path!r} has {a.shape[1]}")
            w = torch.tensor(entry.weight, dtype=torch.float32)
            crit = torch.tensor(entry.critical, dtype=torch.bool)
        total = total + layer_term(a, f_prev[path], w, crit)
    return total / len(f_new)


def diversified_objective(model: nn.Module, prev: nn.Module, layers: Sequence[str], weight: float,
                          granularity: GranularityMap | None = None, label_smoothing: float = 0.0):
    """The step objective ``(x, y, idx) -> (loss, logits, parts)`` of member i for
    :func:`kdcli.train.loop.fit`: CE + ``weight`` · D against the frozen ``prev``."""
    prev.eval()
    for p in prev.parameters():
        p.requires_grad_(False)
    taps_new = FeatureTaps(model, layers, where="teacher.layers", role="member")
    taps_prev = FeatureTaps(prev, layers, where="teacher.layers", role="member")

    def objective(x, y, idx):
        with torch.no_grad(), taps_prev:
            prev(x)
        f_prev = taps_prev.collect()
        with taps_new:
            logits = model(x)
        div = diversification_term(taps_new.collect(), f_prev, granularity)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        return ce + weight * div, logits, {"ce": ce.detach(), "diversification": div.detach()}

    return objective


def predecessor_granularity(prev: nn.Module, layers: Sequence[str], batches, critical_fraction: float) -> GranularityMap:
    """The granularity map of ``prev`` on ``batches`` of ``(x, ...)``: activation sensitivity of
    each tapped feature, the top ``critical_fraction`` critical (:mod:`kdcli.analyze.sensitivity`)."""

    stats = activation_statistics(prev, batches, list(layers))
    return granularity_map(stats, critical_fraction=critical_fraction)


def train_diversified(build: Callable[[int], nn.Module], data, cfg, *, members: int, weight: float,
                      layers: Sequence[str] | str = "auto", granularity: GranularityMap | None = None,
                      critical_fraction: float = 0.25, sensitivity_samples: int = 1024, device=None,
                      seed: int = 0, progress: Callable[[int, dict], None] | None = None) -> tuple[list[nn.Module], list[dict]]:
    """Train ``members`` models from ``build(i)`` in sequence on ``data`` (a DataBundle) with
    :func:`kdcli.train.loop.fit` and ``cfg`` (a TrainSpec): member 0 with cross-entropy, member i with
    :func:`diversified_objective` against member i−1. ``granularity`` None computes the map from
    each predecessor on the first ``sensitivity_samples`` validation samples
    (:func:`predecessor_granularity`); ``weight`` 0 trains independent members with the same loop.
    Member i uses seed ``seed + i`` for its initialisation and data order. Returns the members in
    eval mode and per member ``{"member", "seconds", "train_loss", "critical_features"}``."""

    device = torch.device(device or "cpu")
    trained: list[nn.Module] = []
    infos: list[dict] = []
    for i in range(members):
        torch.manual_seed(seed + i)
        model = build(i).to(device)
        if isinstance(layers, str):
            example = torch.zeros(2, *data.input_shape, device=device)
            layers = auto_layers(model, example)
        loader = data.loader("train", train=True, device=device, seed=seed + i)
        objective, critical = None, 0
        if i > 0 and weight > 0:
            gmap = granularity
            if gmap is None:
                x, _ = data.eval_tensors("val" if len(data.val) else "train", device, limit=sensitivity_samples)
                gmap = predecessor_granularity(trained[-1], layers, [(x[j:j + 256],) for j in range(0, len(x), 256)],
                                               critical_fraction)
            critical = sum(sum(gmap.layers[p].critical) for p in layers if p in gmap.layers)
            objective = diversified_objective(model, trained[-1], layers, weight, gmap, cfg.label_smoothing)
        res = fit(model, loader, cfg, objective=objective, device=device,
                  progress=None if progress is None else (lambda m, i=i: progress(i, m)))
        model.eval()
        trained.append(model)
        infos.append({"member": i, "seconds": res.seconds, "train_loss": res.last.get("train_loss", math.nan),
                      "critical_features": critical})
    return trained, infos


class AveragedEnsemble(nn.Module):
    """Members whose probabilities are averaged: ``forward(x)`` → log mean_m softmax(z_m) [N, K],
    logits up to a constant, so the ensemble serves as a teacher like any model."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise InputError("ensemble: no members")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x).float(), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))
