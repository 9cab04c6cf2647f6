"""Variational information distillation (Ahn et al. 2019) and all-to-all layer pairing.

VID maximises a variational lower bound of the mutual information I(t; s) between a teacher
feature t and a student feature s: with a Gaussian q(t|s) = N(μ(s), diag σ²), maximising
E[log q(t|s)] is minimising the negative log-likelihood below (the entropy H(t) is a constant
for the student). All-to-all pairing extends it to every teacher layer i and student layer j:

    L = β·CE − (1 − β)·Σ_ij λ_ij·I(t_i, s_j),   Σ_i λ_ij = 1 for each student layer j,

with −I replaced by the VID bound, so the feature term is Σ_ij λ_ij·VID_ij. In a recipe, β is the
``ce`` term's weight and 1 − β the ``vid`` term's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdcli.distill.losses.base import (ChannelWeights, Layers, Term, check_rank, nearest_teacher, per_channel_loss,
                               pool_to, smaller, to_vector)


def vid_nll(mu: torch.Tensor, var: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None,
            critical: torch.Tensor | None = None) -> torch.Tensor:
    """Ahn et al. 2019, eq. 2 and 4: ``−log q(t|s)`` with ``q = N(μ(s), diag σ²)``, constant
    ½·log 2π dropped, averaged over batch, channels and positions:
    ``Σ_c w_c·m_c / C`` with ``m_c`` the mean over (batch, positions) of
    ``(t_c − μ_c)²/(2σ²_c) + ½·log σ²_c``.

    This is the reduction of the reference implementations: ``torch.mean(0.5 * ((pred_mean -
    target)**2 / pred_var + log(pred_var)))`` over all (N, C, H, W) elements
    (HobbitLong/RepDistiller, distiller_zoo/VID.py, "code from author"
    ssahn0215/variational-information-distillation; torchdistill's ``VIDLoss``,
    torchdistill/losses/mid_level.py, the same ``neg_log_prob.mean()``). The paper writes the sum
    over C·H·W; the mean is that sum divided by C·H·W, and the published weights are for the mean
    (RepDistiller's CIFAR-100 benchmark: ``-b 1`` with cross-entropy weight 1).

    ``mu`` and ``t`` are (N, C) or (N, C, H, W), ``var`` is (C,) and positive. Uniform weights by
    default (the plain mean); ``critical`` channels are compared after global pooling. The value
    can be negative once σ² < 1 (a log-likelihood, not a distance).
    """
    shape = (1, -1) + (1,) * (mu.dim() - 2)
    v = var.float().view(shape)
    fn = lambda m, x: (x.float() - m.float()).pow(2) / (2 * v) + 0.5 * v.log()  # noqa: E731
    per = per_channel_loss(fn, mu, t, critical)
    return per.mean() if weight is None else (weight * per).sum() / per.numel()


def gaussian_entropy(t: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``Σ_c w_c·(½·log Var(t_c) + ½) / C``: the differential entropy per channel of a Gaussian
    with each channel's batch variance (over samples and positions), ½·log 2π dropped and
    averaged over channels as in :func:`vid_nll`, so that ``H(t) − nll`` estimates the
    variational lower bound on I(t; s) per channel (Ahn et al. 2019, eq. 2)."""
    dims = [0] + list(range(2, t.dim()))
    h = 0.5 * t.detach().float().var(dim=dims, unbiased=False).add(eps).log() + 0.5
    return h.mean() if weight is None else (weight * h).sum() / h.numel()


class VIDRegressor(nn.Module):
    """μ(s) and σ² of q(t|s): the paper's three 1x1 convolutions with ReLU in between (three
    Linear layers for vectors), hidden width = the teacher's channels as in the authors' code, and
    a learned per-channel variance ``σ²_c = softplus(α_c) + ε`` starting at ``init_var``: the
    reference's ``pred_var = log(1 + exp(log_scale)) + eps`` with ``log_scale`` initialised to
    ``log(exp(init_pred_var − eps) − 1)``, init 5.0 and eps 1e-5 (RepDistiller, distiller_zoo/VID.py).
    The reference's convolutions have no bias; these have one."""

    def __init__(self, cs: int, ct: int, vector: bool, init_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        layer = (lambda i, o: nn.Linear(i, o)) if vector else (lambda i, o: nn.Conv2d(i, o, 1))
        self.mean = nn.Sequential(layer(cs, ct), nn.ReLU(), layer(ct, ct), nn.ReLU(), layer(ct, ct))
        self.eps = eps
        # softplus⁻¹(init_var − ε), so that σ² starts at init_var exactly.
        self.alpha = nn.Parameter(torch.full((ct,), math.log(math.expm1(max(init_var - eps, 1e-6)))))

    def variance(self) -> torch.Tensor:
        """σ² per teacher channel, (C_t,)."""
        return nn.functional.softplus(self.alpha) + self.eps

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(s), self.variance()


def fixed_lambda(nt: int, ns: int, mode: str) -> torch.Tensor:
    """λ (teacher × student) for fixed pairings: ``pairwise`` puts 1 on each student layer's
    nearest teacher layer (the diagonal when counts match); ``uniform`` puts 1/nt everywhere."""
    if mode == "uniform":
        return torch.full((nt, ns), 1.0 / nt)
    lam = torch.zeros(nt, ns)
    for j, i in enumerate(nearest_teacher(nt, ns)):
        lam[i, j] = 1.0
    return lam


class VIDTerm(Term, kind="vid"):
    """VID summed over layer pairs with weights λ_ij (see the module docstring), each pair's
    :func:`vid_nll` a mean over batch, channels and positions as in the reference code, so
    ``pairing: pairwise`` with ``weight: 1`` (and ``ce`` weight 1) is RepDistiller's published
    CIFAR-100 setting (``--distill vid -a 0 -b 1``, the loss summed over the tapped layers).

    ``pairing: pairwise`` uses each student layer's nearest teacher layer only; ``all-to-all``
    uses every pair with λ ``uniform`` (1/nt) or ``learned`` (a softmax over teacher layers of a
    learned logit matrix, per student layer, trained with the student). Spatial sizes are matched
    by average pooling the larger side; a vector on either side pools the other to a vector."""

    def __init__(self, spec, name: str, layers: Layers, gmap=None):
        super().__init__(name, spec.weight)
        self.teacher_layers, self.student_layers = layers.teacher, layers.student
        nt, ns = len(layers.teacher), len(layers.student)
        for t in layers.teacher:
            check_rank(layers.t_shapes[t], t, f"{layers.where}.teacher_layers")
        for s in layers.student:
            check_rank(layers.s_shapes[s], s, f"{layers.where}.student_layers")
        self.learned = spec.pairing == "all-to-all" and spec.lambda_ == "learned"
        if self.learned:
            self.lambda_logits = nn.Parameter(torch.zeros(nt, ns))
        else:
            mode = "pairwise" if spec.pairing == "pairwise" else "uniform"
            self.register_buffer("fixed", fixed_lambda(nt, ns, mode), persistent=False)
        active = torch.ones(nt, ns, dtype=torch.bool) if spec.pairing == "all-to-all" else fixed_lambda(nt, ns, "pairwise") > 0
        self.active = [(i, j) for i in range(nt) for j in range(ns) if active[i, j]]
        self.regressors = nn.ModuleDict()
        self._sizes = {}
        for i, j in self.active:
            ts, ss = layers.t_shapes[layers.teacher[i]], layers.s_shapes[layers.student[j]]
            vec = len(ts) == 1 or len(ss) == 1
            self._sizes[(i, j)] = None if vec else smaller(ss[1:], ts[1:])
            self.regressors[f"{i}_{j}"] = VIDRegressor(ss[0], ts[0], vec, spec.init_var, spec.eps)
        used = sorted({i for i, _ in self.active})
        self._used = used
        self.grains = nn.ModuleList(ChannelWeights(gmap if spec.granularity else None, layers.teacher[i],
                                                   layers.t_shapes[layers.teacher[i]][0], layers.where)
                                    for i in range(nt))

    def lambda_matrix(self) -> torch.Tensor:
        """λ, (teacher layers × student layers); each column sums to 1."""
        return torch.softmax(self.lambda_logits, dim=0) if self.learned else self.fixed

    def targets(self, t_logits, t_feats):
        return {f"{self.name}.t{i}": t_feats[self.teacher_layers[i]] for i in self._used}

    def forward(self, s_logits, s_feats, targets, y):
        lam = self.lambda_matrix()
        total = 0.0
        for i, j in self.active:
            s, t = s_feats[self.student_layers[j]], targets[f"{self.name}.t{i}"]
            size = self._sizes[(i, j)]
            s, t = (to_vector(s), to_vector(t)) if size is None else (pool_to(s, size), pool_to(t, size))
            mu, var = self.regressors[f"{i}_{j}"](s)
            g = self.grains[i]
            nll = vid_nll(mu, var, t, g.weight, g.critical)
            if self.learned:
                # λ follows the information per teacher channel, not the raw bound: value and
                # student gradients are those of Σ λ·nll, but λ's gradient is that of
                # Σ λ·(nll − H(t_i)), both per channel. Raw nll omits H(t_i), which differs
                # between teacher layers, so λ collapsed onto the layer of least entropy.
                excess = (nll - gaussian_entropy(t, g.weight)).detach()
                total = total + lam[i, j].detach() * nll + (lam[i, j] - lam[i, j].detach()) * excess
            else:
                total = total + lam[i, j] * nll
        return total
