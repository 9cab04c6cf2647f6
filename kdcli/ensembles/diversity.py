"""How different the members of an ensemble are: prediction disagreement and linear CKA.

- Disagreement rate of two classifiers: the fraction of inputs on which their top-1 predictions
  differ (0 for identical predictions).
- Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited",
  eq. 5 with a linear kernel): for column-centred X [n, p1] and Y [n, p2],
  ``CKA = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F)``. It is 1 for identical representations, invariant to
  orthogonal transforms and isotropic scaling, and near 0 for independent ones. Feature maps
  are flattened per input ([N, C·H·W]).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn

from kdcli.distill.taps import FeatureTaps


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of representations ``x`` [n, ...] and ``y`` [n, ...] of the same n inputs."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear CKA: {x.shape[0]} and {y.shape[0]} inputs; both need the same inputs")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if x.shape[1] * y.shape[1] > x.shape[0] ** 2:   # wide features: the n×n Gram form is cheaper
        kx, ky = x @ x.T, y @ y.T
        hsic, nx, ny = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        hsic, nx, ny = (y.T @ x).pow(2).sum(), (x.T @ x).norm(), (y.T @ y).norm()
    if nx == 0 or ny == 0:
        return 0.0
    return float(hsic / (nx * ny))


def disagreement_rate(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Fraction of inputs on which the top-1 predictions of two models differ; logits [N, K]."""
    return float((logits_a.argmax(1) != logits_b.argmax(1)).float().mean())


@torch.no_grad()
def ensemble_diversity(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor | None = None,
                       layers: Sequence[str] = (), batch_size: int = 512) -> dict:
    """Diversity of ``members`` on inputs ``x`` [N, ...] (labels ``y`` [N] for accuracies):
    ``disagreement`` (mean over pairs) and ``pairwise_disagreement``; ``cka`` per layer (mean
    over pairs, member features at the same module path); with ``y``, ``member_accuracy`` and
    ``ensemble_accuracy`` (averaged probabilities). Keep N around a few thousand: CKA holds the
    features of all N inputs."""
    logits, feats = [], []
    for m in members:
        m.eval()
        taps = FeatureTaps(m, layers, role="member")
        outs, fs = [], {p: [] for p in layers}
        for i in range(0, len(x), batch_size):
            with taps:
                outs.append(m(x[i:i + batch_size]).float().cpu())
            for p, t in taps.collect().items():
                fs[p].append(t.float().cpu())
        logits.append(torch.cat(outs))
        feats.append({p: torch.cat(v) for p, v in fs.items()})
    pairs = list(itertools.combinations(range(len(members)), 2))
    pairwise = {f"{a}-{b}": disagreement_rate(logits[a], logits[b]) for a, b in pairs}
    out = {"members": len(members), "samples": int(len(x)),
           "disagreement": sum(pairwise.values()) / max(len(pairwise), 1), "pairwise_disagreement": pairwise,
           "cka": {p: sum(linear_cka(feats[a][p], feats[b][p]) for a, b in pairs) / max(len(pairs), 1)
                   for p in layers}}
    if y is not None:
        y = y.cpu()
        out["member_accuracy"] = [float((lg.argmax(1) == y).float().mean()) for lg in logits]
        mean_p = torch.stack([torch.softmax(lg, 1) for lg in logits]).mean(0)
        out["ensemble_accuracy"] = float((mean_p.argmax(1) == y).float().mean())
    return out
