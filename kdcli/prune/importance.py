"""Channel importance per torch-pruning group: the criteria DKDP and ``kdcli analyze`` score with.

- ``magnitude`` / ``magnitude-l1``: the L2 / L1 norm of the group's weights (Li et al. 2017,
  "Pruning Filters for Efficient ConvNets"), reduced over the group's layers by torch-pruning;
- ``taylor``: the first-order Taylor estimate of the loss change when a channel is removed,
  |w · ∂L/∂w| summed over the group (Molchanov et al. 2019, "Importance Estimation for Neural
  Network Pruning"), with gradients of the cross-entropy over a few batches;
- ``activation``: the mean |activation| a channel feeds its consumers (the activation-frequency
  criterion of Hu et al. 2016, "Network Trimming", as a magnitude rather than a zero count);
- ``bn-scale``: |γ| of the BatchNorm after the layer (Liu et al. 2017, "Network Slimming").

:func:`group_importance` gives raw scores; :class:`kdcli.prune.pruner.StructuredPruner` normalises them
within each group so that one threshold τ compares across groups.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from kdcli import distributed
from kdcli.config.importance import NAMES
from kdcli.models.utils import first_tensor, grads_enabled

IMPORTANCES = NAMES  # the criteria, from kdcli.config.importance
ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def group_importance(model: nn.Module, dg: tp.DependencyGraph, groups: Mapping[str, object], criterion: str,
                     batches: list | None = None) -> dict[str, torch.Tensor | None]:
    """Raw importance of every channel of each group, ``{name: (channels,) tensor}``; ``None``
    for a group the criterion cannot score (bn-scale without BatchNorm, activation without a
    consumer). ``model`` must be in eval mode; ``batches`` (``(x, y, ...)`` tuples on the model's
    device) are needed by taylor and activation."""
    if criterion == "taylor":
        with taylor_gradients(model, batches or []):
            return _torch_pruning(TaylorImportance(), groups)
    if criterion == "activation":
        with activation_stats(model, groups.values(), batches or []) as means:
            return {name: activation_score(dg, g, means) for name, g in groups.items()}
    if criterion == "bn-scale":
        return _torch_pruning(tp.importance.BNScaleImportance(normalizer=None), groups)
    p = 1 if criterion == "magnitude-l1" else 2
    return _torch_pruning(tp.importance.GroupMagnitudeImportance(p=p, normalizer=None), groups)


class TaylorImportance(tp.importance.GroupTaylorImportance):
    """First-order Taylor importance (Molchanov et al. 2019), summed over the group: Σ|w·∂L/∂w| of
    every layer the channel touches, plus the |γ·∂L/∂γ| of its BatchNorm (their Taylor-FO-BN).
    torch-pruning 1.6's own class leaves BatchNorm out (its BN branch tests the GroupNorm
    handler), so the BN term is added here. Sums, not means, over the group's layers: the pruner
    divides each group by its mean anyway, and a sum keeps the BN term's weight right."""

    def __init__(self):
        super().__init__(group_reduction="sum", normalizer=None)

    @torch.no_grad()
    def __call__(self, group):
        imp = super().__call__(group)
        for i, (dep, idxs) in enumerate(group):
            m = dep.target.module
            if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight.grad is not None
                    and dep.handler == tp.prune_batchnorm_out_channels):
                local = (m.weight.data[idxs] * m.weight.grad.data[idxs]).abs()
                if imp is None:
                    imp = torch.zeros(len(group[0].idxs), device=local.device)
                imp[torch.as_tensor(group[i].root_idxs, device=imp.device)] += local.to(imp.dtype)
        return imp


def _torch_pruning(imp, groups: Mapping[str, object]) -> dict:
    out = {}
    for name, group in groups.items():
        s = imp(group)
        out[name] = None if s is None else s.reshape(-1)
    return out


def mean_over_ranks(raw: dict) -> dict:
    """Under torchrun, average data-driven scores over ranks: each rank scores its own batches,
    and every rank must prune the same channels (the sum comes back identical on every rank)."""
    if not distributed.active():
        return raw
    names = list(raw)
    flat = torch.cat([raw[n].detach().float().reshape(-1) for n in names])
    flat = (distributed.sum_over_ranks(flat) / distributed.world_size()).float().cpu()
    out, start = {}, 0
    for n in names:
        out[n] = flat[start:start + raw[n].numel()]
        start += raw[n].numel()
    return out


@contextmanager
def taylor_gradients(model: nn.Module, batches: list) -> Iterator[None]:
    """Gradients of the cross-entropy summed over ``batches`` in ``.grad`` (for GroupTaylorImportance);
    the parameters' previous gradients are put back afterwards."""
    saved = [(p, p.grad) for p in model.parameters()]
    for p, _ in saved:
        p.grad = None
    try:
        with grads_enabled(model):
            for batch in batches:
                x, y = batch[0], batch[1]
                F.cross_entropy(first_tensor(model(x)), y).backward()
        for p, _ in saved:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        yield
    finally:
        for p, g in saved:
            p.grad = g


@contextmanager
def activation_stats(model: nn.Module, groups, batches: list) -> Iterator[dict]:
    """Mean |input| per input channel of every conv/linear consuming a group's channels, over all
    samples and positions of ``batches`` (torch-pruning's ActivationImportance keeps only the
    last batch, and its reduction mis-sizes groups that reach a Linear through a flatten)."""
    layers = {dep.target.module for g in groups for dep, _ in g if isinstance(dep.target.module, ROOT_TYPES)}
    sums: dict[nn.Module, list] = {}

    def hook(m, inputs, output):
        a = inputs[0].detach().abs().float()
        a = a.reshape(-1, a.shape[-1]) if isinstance(m, nn.Linear) else a.transpose(0, 1).reshape(a.shape[1], -1).T
        acc = sums.setdefault(m, [0.0, 0])
        acc[0] = acc[0] + a.sum(0)
        acc[1] += a.shape[0]

    hooks = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch[0])
    finally:
        for h in hooks:
            h.remove()
    yield {m: total / max(count, 1) for m, (total, count) in sums.items()}


def activation_score(dg: tp.DependencyGraph, group, means: dict) -> torch.Tensor | None:
    """A group's channels scored by the mean |activation| its consumers receive from them, summed
    over positions a flatten spreads a channel to and averaged over consumers."""
    n = len(group[0].idxs)
    total, consumers = torch.zeros(n), 0
    for item in group:
        m = item.dep.target.module
        if m in means and dg.is_in_channel_pruning_fn(item.dep.handler):
            local = means[m].cpu()
            total.scatter_add_(0, torch.tensor(item.root_idxs), local[torch.tensor(item.idxs)])
            consumers += 1
    return total / consumers if consumers else None
