"""Feature losses with a regressor or connector: FitNets hints and activation boundaries.

Adapters are chosen from the shapes seen in the Distiller's dummy forward pass, never written by
hand. Features are per sample either vectors (N, C) or maps (N, C, H, W); when one side of a pair
is a vector and the other a map, the map is globally average-pooled to a vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.distill.losses.base import ChannelWeights, Layers, Term, check_rank, pairs, per_channel_loss, pool_to, smaller, to_vector


class GlobalPool(nn.Module):
    """(N, C, H, W) -> (N, C): global average pooling, as a module so it can start a regressor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_vector(x)


def make_regressor(s_shape: torch.Size, t_shape: torch.Size) -> nn.Module:
    """FitNets regressor (Romero et al. 2015, section 2.2) from a student feature of per-sample shape
    ``s_shape`` to the teacher's ``t_shape``: ``(C,)`` or ``(C, H, W)``.

    - vectors (or a map on one side, pooled to a vector): ``Linear``;
    - same spatial size: a 1x1 convolution;
    - student larger: a strided convolution with kernel = stride = the size ratio when it divides,
      else the paper's valid convolution with kernel ``H_s - H_t + 1`` (per spatial dimension);
    - student smaller: the transposed counterpart (kernel = stride = ratio, or ``H_t - H_s + 1``);
    - larger in one dimension and smaller in the other: pool to the teacher's size, then 1x1.
    """
    cs, ct = s_shape[0], t_shape[0]
    if len(s_shape) == 1 or len(t_shape) == 1:
        lin = _identity_start(nn.Linear(cs, ct))
        return lin if len(s_shape) == 1 else nn.Sequential(GlobalPool(), lin)
    hs, ht = tuple(s_shape[1:]), tuple(t_shape[1:])
    if hs == ht:
        return _identity_start(nn.Conv2d(cs, ct, 1))
    down = all(a >= b for a, b in zip(hs, ht))
    up = all(a <= b for a, b in zip(hs, ht))
    if not (down or up):
        return nn.Sequential(nn.AdaptiveAvgPool2d(ht), nn.Conv2d(cs, ct, 1))
    big, small = (hs, ht) if down else (ht, hs)
    kernel = tuple(b // s if b % s == 0 else b - s + 1 for b, s in zip(big, small))
    stride = tuple(b // s if b % s == 0 else 1 for b, s in zip(big, small))
    if down:
        return nn.Conv2d(cs, ct, kernel, stride)
    return nn.ConvTranspose2d(cs, ct, kernel, stride)


def _identity_start(layer: nn.Module) -> nn.Module:
    """A 1x1 convolution or Linear between features of the same width starts as the identity
    (weight I, bias 0): a student pruned from its teacher, whose layer keeps the teacher's width,
    then starts the hint at its own error instead of at a random projection's (the 1x1 adapter
    of Li et al. 2020, FSKD, starts the same way). Other widths keep PyTorch's initialisation."""
    w = layer.weight
    if w.shape[0] == w.shape[1]:
        with torch.no_grad():
            w.zero_()
            w.view(w.shape[0], w.shape[1], -1)[:, :, 0].copy_(torch.eye(w.shape[0]))
            if layer.bias is not None:
                layer.bias.zero_()
    return layer


def _sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2)


def hint_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
              critical: torch.Tensor | None = None) -> torch.Tensor:
    """FitNets hint loss between the regressed student feature ``pred`` and the teacher's hint
    ``target`` (same shape, (N, C) or (N, C, H, W)): the mean squared error, per channel
    ``m_c`` (mean over batch and positions), combined as ``Σ_c w_c·m_c / C``. Uniform ``weight``
    gives the plain MSE (the paper's ½‖·‖² up to a constant factor). ``critical`` channels are
    matched after global pooling (granularity-weighted distillation)."""
    m = per_channel_loss(_sq, pred, target, critical)
    if weight is None:
        return m.mean()
    return (weight * m).sum() / m.numel()


class HintTerm(Term, kind="hint"):
    """FitNets (Romero et al. 2015): for each (hint, guided) layer pair, a regressor on the
    student's guided layer fitted to the teacher's hint layer by :func:`hint_loss`; summed over
    pairs. With ``granularity: true`` the teacher layer's channels are weighted and its critical
    channels pooled, from the granularity map."""

    def __init__(self, spec, name: str, layers: Layers, gmap=None):
        super().__init__(name, spec.weight)
        self.pairs = pairs(layers)
        self.teacher_layers, self.student_layers = layers.teacher, layers.student
        self.regressors = nn.ModuleList()
        self.grains = nn.ModuleList()
        self._vector_target = []
        for t, s in self.pairs:
            ts, ss = layers.t_shapes[t], layers.s_shapes[s]
            check_rank(ts, t, f"{layers.where}.teacher_layers")
            check_rank(ss, s, f"{layers.where}.student_layers")
            vec = len(ts) == 1 or len(ss) == 1
            self._vector_target.append(vec)
            self.regressors.append(make_regressor(ss, ts[:1] if vec else ts))
            self.grains.append(ChannelWeights(gmap if spec.granularity else None, t, ts[0], layers.where))

    def targets(self, t_logits, t_feats):
        return {f"{self.name}.t{k}": to_vector(t_feats[t]) if vec else t_feats[t]
                for k, ((t, _), vec) in enumerate(zip(self.pairs, self._vector_target))}

    def forward(self, s_logits, s_feats, targets, y):
        total = 0.0
        for k, ((_, s), reg, g) in enumerate(zip(self.pairs, self.regressors, self.grains)):
            total = total + hint_loss(reg(s_feats[s]), targets[f"{self.name}.t{k}"], g.weight, g.critical)
        return total


def ab_loss(r_s: torch.Tensor, t: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries", eq. 5:
    ``‖ρ(T)⊙ReLU(m − r(S)) + (1 − ρ(T))⊙ReLU(m + r(S))‖²₂`` with ``ρ(T) = 1[T > 0]``, the squared
    L2 norm per sample (summed over channels and positions), averaged over the batch.

    That is the authors' reduction: ``criterion_alternative_L2(...) / batch_size``, a sum over
    all elements divided by the batch (bhheo/AB_distillation, cifar10_AB_distillation.py; the
    same in HobbitLong/RepDistiller, distiller_zoo/AB.py). ``r_s`` is the connector's output
    (pre-activation, same shape as ``t``, (N, C) or (N, C, H, W)); ``t`` is the teacher's feature
    or already its boolean mask ρ(T). The value grows with the layer's C·H·W, as the authors' does,
    which is why their weight is small (3/1000, see :class:`ABTerm`).
    """
    rho = t if t.dtype == torch.bool else t > 0
    rho = rho.to(torch.float32)
    r = r_s.float()
    per = rho * F.relu(margin - r).pow(2) + (1 - rho) * F.relu(margin + r).pow(2)
    return per.flatten(1).sum(1).mean()


def make_connector(cs: int, ct: int, vector: bool) -> nn.Module:
    """AB's connector r: 1x1 convolution + BatchNorm (Linear + BatchNorm1d for vectors)."""
    if vector:
        return nn.Sequential(nn.Linear(cs, ct, bias=False), nn.BatchNorm1d(ct))
    return nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))


class ABTerm(Term, kind="ab"):
    """Activation-boundary transfer: ``Σ_k d^(L−1−k)·ab_loss_k`` over the L layer pairs in
    ``student_layers`` order (shallow to deep), ``d`` = ``layer_decay``.

    The authors weight the deepest pair 1 and halve the weight at each shallower one, then scale
    the sum by 3/1000: ``loss = (ab_3 + ab_2/2 + ab_1/4) / 1000 * 3`` with ``ab_k`` as in
    :func:`ab_loss` (bhheo/AB_distillation, cifar10_AB_distillation.py, ``Distillation``; the
    ImageNet wrapper in models/distillation_module.py uses ``/ 1000`` and a multiplier;
    RepDistiller's ``ABLoss`` has ``w = 2**(i - L + 1)`` and ``/ 1000 * 3``). So ``layer_decay: 0.5``
    (the default) and ``weight: 0.003`` reproduce the authors' CIFAR objective exactly. The
    authors train with it alone, as an initialisation stage of the student and connectors, then
    train for classification; kdcli adds it to the other terms of one objective at that scale.

    Pre-activation features: ρ(T) = 1[T > 0] is the same before and after a ReLU, so the teacher's
    tapped outputs (post-activation, as ``auto`` picks them) give the exact activation boundary;
    the student side is the connector's output, a pre-activation by construction. Spatial sizes
    are matched by average pooling the larger side (the student before the connector; the
    teacher's feature before thresholding)."""

    def __init__(self, spec, name: str, layers: Layers, gmap=None):
        super().__init__(name, spec.weight)
        self.margin = spec.margin
        self.pairs = pairs(layers)
        n = len(self.pairs)
        self.layer_factors = [float(spec.layer_decay) ** (n - 1 - k) for k in range(n)]
        self.teacher_layers, self.student_layers = layers.teacher, layers.student
        self.connectors = nn.ModuleList()
        self._sizes = []
        for t, s in self.pairs:
            ts, ss = layers.t_shapes[t], layers.s_shapes[s]
            check_rank(ts, t, f"{layers.where}.teacher_layers")
            check_rank(ss, s, f"{layers.where}.student_layers")
            vec = len(ts) == 1 or len(ss) == 1
            self._sizes.append(None if vec else smaller(ss[1:], ts[1:]))
            self.connectors.append(make_connector(ss[0], ts[0], vec))

    def targets(self, t_logits, t_feats):
        out = {}
        for k, ((t, _), size) in enumerate(zip(self.pairs, self._sizes)):
            f = t_feats[t]
            out[f"{self.name}.rho{k}"] = (to_vector(f) if size is None else pool_to(f, size)) > 0
        return out

    def forward(self, s_logits, s_feats, targets, y):
        total = 0.0
        for k, ((_, s), conn, size, c) in enumerate(zip(self.pairs, self.connectors, self._sizes, self.layer_factors)):
            f = s_feats[s]
            f = to_vector(f) if size is None else pool_to(f, size)
            total = total + c * ab_loss(conn(f), targets[f"{self.name}.rho{k}"], self.margin)
        return total
