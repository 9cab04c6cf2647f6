"""Feature losses on summaries of the features: attention transfer and FSP flow matrices.

Neither needs the student and teacher to have the same channel count for AT (the map averages
over channels); FSP maps student channels to the teacher's with a 1x1 adapter when they differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.errors import InputError
from kdcli.distill.losses.base import Layers, Term, check_rank, pairs, pool_to, smaller, to_vector


def attention_map(f: torch.Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017, spatial attention of (N, C, H, W) features, as the authors'
    ``at(x) = F.normalize(x.pow(2).mean(1).view(N, -1))`` (szagoruyko/attention-transfer,
    utils.py / cifar.py), generalised to ``Q = mean_c |f_c|^p`` -> (N, H·W), L2-normalised per sample.

    With ``size`` the *features* are average-pooled to that spatial size first, before the power,
    as in RepDistiller's ``Attention.at_loss`` (HobbitLong/RepDistiller, distiller_zoo/AT.py): the
    map of pooled features, not the pooled map."""
    f = f.float()
    if size is not None:
        f = pool_to(f, size)
    a = f.abs().pow(p).mean(1)
    return F.normalize(a.flatten(1), dim=1)


def at_loss(a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """The authors' ``at_loss``: ``(at(s) − at(t)).pow(2).mean()``, the mean over batch and the
    H·W positions of the squared difference of the normalised maps (N, H·W).

    The paper's eq. 2 writes ``β/2 · Σ_j ‖Q_S/‖Q_S‖ − Q_T/‖Q_T‖‖_p`` and sets β to 10³ divided by
    the number of map elements and the batch size. The code that produced the published numbers
    (cifar.py and imagenet.py of szagoruyko/attention-transfer) computes
    ``opt.beta * sum(at_loss(x, y) for each group)``, with ``--beta 1e+3`` in its README and no
    ½. This function is that ``at_loss``, so a term weight of 1000 reproduces the authors' code
    exactly (on one GPU: their ``data_parallel`` sums the per-GPU means, so n GPUs give n×).
    """
    return (a_s - a_t).pow(2).mean()


class ATTerm(Term, kind="at"):
    """Attention transfer, summed over layer pairs: ``Σ_j at_loss_j`` (see :func:`at_loss`), so
    ``weight: 1000`` is the authors' β = 10³. Spatial sizes are matched by average-pooling the
    larger side's features to the smaller size before the attention map is computed."""

    def __init__(self, spec, name: str, layers: Layers, gmap=None):
        super().__init__(name, spec.weight)
        self.p = spec.p
        self.pairs = pairs(layers)
        self.teacher_layers, self.student_layers = layers.teacher, layers.student
        self._sizes = []
        for t, s in self.pairs:
            ts, ss = layers.t_shapes[t], layers.s_shapes[s]
            check_rank(ts, t, f"{layers.where}.teacher_layers", ranks=(3,))
            check_rank(ss, s, f"{layers.where}.student_layers", ranks=(3,))
            self._sizes.append(smaller(ss[1:], ts[1:]))

    def targets(self, t_logits, t_feats):
        return {f"{self.name}.a{k}": attention_map(t_feats[t], self.p, size)
                for k, ((t, _), size) in enumerate(zip(self.pairs, self._sizes))}

    def forward(self, s_logits, s_feats, targets, y):
        total = 0.0
        for k, ((_, s), size) in enumerate(zip(self.pairs, self._sizes)):
            total = total + at_loss(attention_map(s_feats[s], self.p, size), targets[f"{self.name}.a{k}"])
        return total


def fsp_matrix(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Yim et al. 2017, eq. 1: the flow matrix ``G = F1ᵀ·F2 / (h·w)`` of two features of one
    network, (N, C1, H, W) and (N, C2, H', W') -> (N, C1, C2). The larger spatial size is
    average-pooled to the smaller; a vector (N, C) counts as a 1x1 map."""
    f1, f2 = f1.float(), f2.float()
    if f1.dim() == 2 or f2.dim() == 2:
        f1, f2 = to_vector(f1)[..., None], to_vector(f2)[..., None]
    else:
        size = smaller(f1.shape[2:], f2.shape[2:])
        f1, f2 = pool_to(f1, size).flatten(2), pool_to(f2, size).flatten(2)
    return torch.bmm(f1, f2.transpose(1, 2)) / f1.shape[2]


def fsp_loss(g_s: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of flow matrices (N, C1, C2): the paper's ‖G_t − G_s‖² per pair,
    averaged over the batch and the C1·C2 entries so it does not grow with the widths."""
    return (g_s - g_t).pow(2).mean()


def _channel_adapter(cs: int, ct: int, vector: bool) -> nn.Module:
    if cs == ct:
        return nn.Identity()
    return nn.Linear(cs, ct, bias=False) if vector else nn.Conv2d(cs, ct, 1, bias=False)


class FSPTerm(Term, kind="fsp"):
    """FSP: flow matrices between consecutive tapped layers, teacher vs student, summed over the
    consecutive pairs. Layers are paired as for hints; student features whose channel count differs
    from the paired teacher layer's go through a 1x1 adapter first."""

    def __init__(self, spec, name: str, layers: Layers, gmap=None):
        super().__init__(name, spec.weight)
        self.pairs = pairs(layers)
        if len(self.pairs) < 2:
            raise InputError(f"{layers.where}: fsp needs at least 2 layers on each side "
                             f"(flow between consecutive layers), got {len(self.pairs)}")
        self.teacher_layers, self.student_layers = layers.teacher, layers.student
        self.adapters = nn.ModuleList()
        for t, s in self.pairs:
            ts, ss = layers.t_shapes[t], layers.s_shapes[s]
            check_rank(ts, t, f"{layers.where}.teacher_layers")
            check_rank(ss, s, f"{layers.where}.student_layers")
            self.adapters.append(_channel_adapter(ss[0], ts[0], len(ss) == 1))

    def targets(self, t_logits, t_feats):
        f = [t_feats[t] for t, _ in self.pairs]
        return {f"{self.name}.g{k}": fsp_matrix(f[k], f[k + 1]) for k in range(len(f) - 1)}

    def forward(self, s_logits, s_feats, targets, y):
        f = [a(s_feats[s]) for (_, s), a in zip(self.pairs, self.adapters)]
        total = 0.0
        for k in range(len(f) - 1):
            total = total + fsp_loss(fsp_matrix(f[k], f[k + 1]), targets[f"{self.name}.g{k}"])
        return total
