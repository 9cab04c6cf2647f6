"""Confusable class subsets for specialists, found without labels (Hinton et al. 2015, §5.3).

The generalist's predicted probabilities on the transfer set, ``P`` [N, K], give the class
covariance matrix ``C = cov(P)`` [K, K]. Classes that the generalist tends to predict together
(the confusable ones: it spreads its probability over them on the same inputs) have similar
columns of ``C``; K-means on those columns (scikit-learn, as the paper's on-line K-means) groups
them.

By default the columns are those of the correlation matrix, ``C`` scaled to a unit diagonal
(``cluster_on: correlation``). With few classes, the raw diagonal (each class's variance, which
grows with its frequency and the generalist's confidence on it) dominates the distances between
columns, and K-means isolates the most confidently predicted classes instead of grouping the
confused ones: on Fashion-MNIST with an MLP generalist, covariance columns gave the clusters
{Trouser}, {Ankle boot} and the eight others; correlation columns gave {T-shirt, Shirt},
{Pullover, Dress, Coat} and the footwear with Trouser and Bag. ``cluster_on: covariance`` is the
paper's literal recipe (JFT's 15,000 classes each carry little variance). With ``subset_size``, each specialist covers the ``subset_size`` classes nearest to its
cluster's centroid, so that subsets have the recipe's size and may overlap (the paper's JFT
specialists overlap too); identical subsets are kept once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from kdcli.errors import InputError


@dataclass
class ClassClusters:
    """The specialists' class subsets and what they were found from.

    ``subsets``: sorted class indices per specialist; ``labels``: the K-means cluster of each
    class [K]; ``covariance``: ``cov(P)`` [K, K] (float64), whatever ``cluster_on`` was."""

    subsets: list[list[int]]
    labels: list[int]
    covariance: torch.Tensor

    def to_json(self, class_names: list[str] | None = None) -> dict:
        """JSON form for ``kdcli analyze`` and the run directory (names beside indices)."""
        name = (lambda k: class_names[k]) if class_names else str  # noqa: E731
        return {"subsets": self.subsets, "subset_names": [[name(k) for k in s] for s in self.subsets],
                "cluster_of_class": self.labels,
                "covariance": [[round(float(v), 8) for v in row] for row in self.covariance]}


def class_covariance(probs: torch.Tensor) -> torch.Tensor:
    """Covariance of the predicted probabilities ``probs`` [N, K] over the samples: [K, K] float64."""
    if probs.dim() != 2 or probs.shape[0] < 2:
        raise InputError(f"class covariance: expected probabilities [N >= 2, K], got {list(probs.shape)}")
    return torch.cov(probs.double().T)


def class_correlation(cov: torch.Tensor) -> torch.Tensor:
    """The covariance ``cov`` [K, K] scaled to a unit diagonal; a class never predicted (zero
    variance) gets a zero column but its own 1."""
    sd = cov.diagonal().clamp_min(0).sqrt()
    inv = torch.where(sd > 0, 1 / sd, torch.zeros_like(sd))
    corr = cov * inv[:, None] * inv[None, :]
    return corr.fill_diagonal_(1.0)


def confusable_subsets(probs: torch.Tensor, num_specialists: int, subset_size: int | None = None,
                       seed: int = 0, cluster_on: str = "correlation") -> ClassClusters:
    """Cluster the K classes into ``num_specialists`` subsets by K-means on the columns of the
    covariance of ``probs`` [N, K] (Hinton et al. 2015, §5.3), scaled to correlations unless
    ``cluster_on`` is ``"covariance"``; see the module docstring.

    Every subset leaves at least one class out (the specialist's dustbin needs one)."""
    from sklearn.cluster import KMeans

    if cluster_on not in ("correlation", "covariance"):
        raise InputError(f"teacher.cluster_on: expected correlation or covariance, got {cluster_on!r}")
    cov = class_covariance(probs)
    k = cov.shape[0]
    if not 1 <= num_specialists <= k:
        raise InputError(f"teacher.num_specialists: expected 1..{k} (the number of classes), got {num_specialists}")
    if subset_size is not None and not 2 <= subset_size < k:
        raise InputError(f"teacher.subset_size: expected 2..{k - 1} (a specialist needs a dustbin class), got {subset_size}")
    cols = (class_correlation(cov) if cluster_on == "correlation" else cov).numpy()
    km = KMeans(n_clusters=num_specialists, n_init=10, random_state=seed).fit(cols)
    labels = [int(v) for v in km.labels_]
    subsets: list[list[int]] = []
    for c in range(num_specialists):
        if subset_size is None:
            s = [j for j in range(k) if labels[j] == c]
        else:
            dist = ((torch.from_numpy(cols) - torch.from_numpy(km.cluster_centers_[c])) ** 2).sum(1)
            s = sorted(int(j) for j in torch.sort(dist, stable=True).indices[:subset_size])
        if len(s) >= k:
            raise InputError(f"teacher.num_specialists: K-means put all {k} classes into one subset; "
                             "set subset_size or more specialists (a specialist needs a dustbin class)")
        if s and s not in subsets:
            subsets.append(s)
    return ClassClusters(subsets, labels, cov)


@torch.no_grad()
def predicted_probabilities(model: nn.Module, batches: Iterable, device: torch.device | None = None) -> torch.Tensor:
    """Softmax outputs of ``model`` over batches of ``(x, ...)``: [N, K] float32 on the CPU."""
    was = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out = [torch.softmax(model(b[0].to(device)).float(), 1).cpu() for b in batches]
    model.train(was)
    return torch.cat(out)


def generalist_clusters(generalist: nn.Module, data, *, num_specialists: int, subset_size: int | None = None,
                        samples: int = 10_000, device: torch.device | None = None, seed: int = 0,
                        cluster_on: str = "correlation") -> ClassClusters:
    """The confusable subsets of ``generalist`` on (the first ``samples`` of) the training split
    of ``data`` (a :class:`kdcli.data.loader.DataBundle`), the transfer set. For ``kdcli analyze`` too."""
    device = device or next(generalist.parameters()).device
    x, _ = data.eval_tensors("train", device, limit=samples)
    probs = predicted_probabilities(generalist, [(x[i:i + 512],) for i in range(0, len(x), 512)], device)
    return confusable_subsets(probs, num_specialists, subset_size, seed, cluster_on)
