"""Specialist models and the combined generalist + specialists teacher (Hinton et al. 2015, §5).

A specialist starts as a copy of the generalist whose classifier head covers its subset S of
classes plus one *dustbin* class for all the others. It is trained with cross-entropy on a
transfer set that is half S, half the other classes (:class:`SpecialistTransferLoader`), plus a
soft-target term toward the generalist (:func:`specialist_soft_loss`, Hinton et al. 2015, §6.1)
that keeps it from overfitting its small, enriched training set; the oversampling of S is then
undone by raising the dustbin logit (:func:`dustbin_correction`).
:class:`SpecialistEnsemble` runs the generalist, activates the specialists whose subset holds
one of the generalist's ``top_n`` classes, and returns log q, the KL combination of
:mod:`kdcli.ensembles.combine`, so that any kdcli code treats it as a teacher returning logits.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdcli.config.ensembles import SOFT_TARGET_TEMPERATURE, SOFT_TARGET_WEIGHT
from kdcli.data.loader import BatchLoader, DataBundle, TensorData
from kdcli.ensembles.combine import combine_distributions, expand_specialist
from kdcli.errors import InputError, ModelError
from kdcli.train.loop import evaluate, fit

# ----------------------------------------------------------------------------- the head


def find_head(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The classifier head: the last ``nn.Linear`` (in module order) with ``num_classes``
    outputs, as ``(module path, module)``. A ModelError when there is none."""
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            found = (name, m)
    if found is None:
        raise ModelError(f"specialists: the generalist {type(model).__name__} has no nn.Linear head with "
                         f"{num_classes} outputs; a specialist replaces that head")
    return found


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def specialist_from(generalist: nn.Module, subset: Sequence[int], num_classes: int) -> nn.Module:
    """A copy of ``generalist`` whose head has ``len(subset) + 1`` outputs: the subset's classes
    in ``subset`` order, then the dustbin (Hinton et al. 2015, §5.2: initialised from the generalist).

    Subset rows are copied from the generalist's head. The dustbin row is the mean of the other
    classes' rows with bias ``mean + log(#others)``, i.e. log Σ exp over the other classes'
    logits when those are equal (a lower bound otherwise), so training starts near the
    generalist's own dustbin probability."""
    subset = [int(c) for c in subset]
    rest = [c for c in range(num_classes) if c not in set(subset)]
    if not subset or not rest:
        raise InputError(f"specialists: subset {subset} must be non-empty and leave a class for the dustbin")
    model = copy.deepcopy(generalist)
    path, head = find_head(model, num_classes)
    new = nn.Linear(head.in_features, len(subset) + 1, bias=True).to(head.weight.device, head.weight.dtype)
    with torch.no_grad():
        new.weight[:-1] = head.weight[subset]
        new.weight[-1] = head.weight[rest].mean(0)
        bias = head.bias if head.bias is not None else torch.zeros(num_classes, device=head.weight.device)
        new.bias[:-1] = bias[subset]
        new.bias[-1] = bias[rest].mean() + math.log(len(rest))
    _set_module(model, path, new)
    return model


# ----------------------------------------------------------------------------- the transfer set


class SpecialistTransferLoader:
    """Batches ``(x, y, idx)`` of a specialist's transfer set (Hinton et al. 2015, §5.2): every
    training sample of the subset, plus as many drawn at random from the other classes, so that
    half the examples come from the subset. Labels are the specialist's: the position in
    ``subset``, or ``len(subset)`` (the dustbin) for every other class.

    The other half is redrawn each epoch (without replacement, seeded by ``seed + epoch``) by
    :meth:`set_epoch`, which :func:`kdcli.train.loop.fit` calls; each epoch is a
    :class:`kdcli.data.loader.BatchLoader` over a :class:`kdcli.data.loader.TensorData` subset of the training
    split (so normalisation and augmentation are the recipe's). ``idx`` indexes that epoch's
    subset, not the split: do not cache per index across epochs."""

    def __init__(self, data: DataBundle, subset: Sequence[int], *, device="cpu", seed: int = 0,
                 batch_size: int | None = None):
        self.data, self.device, self.seed = data, torch.device(device), int(seed)
        self.batch_size = int(batch_size or data.batch_size)
        y = data.train.y
        self.subset = [int(c) for c in subset]
        inside = torch.zeros(data.num_classes, dtype=torch.bool)
        inside[self.subset] = True
        self.lut = torch.full((data.num_classes,), len(self.subset), dtype=torch.int64)
        self.lut[self.subset] = torch.arange(len(self.subset))
        self.in_idx = torch.nonzero(inside[y]).flatten()
        self.out_idx = torch.nonzero(~inside[y]).flatten()
        if len(self.in_idx) == 0 or len(self.out_idx) == 0:
            raise InputError(f"specialists: subset {self.subset} has {len(self.in_idx)} training samples and the "
                             f"other classes {len(self.out_idx)}; both are needed")
        self.n_out = min(len(self.in_idx), len(self.out_idx))
        self._loader: BatchLoader | None = None
        self.set_epoch(0)

    def proportions(self) -> dict[str, int]:
        """Sample counts: of the subset and the others, in the transfer set and in the training split."""
        return {"subset_transfer": len(self.in_idx), "others_transfer": self.n_out,
                "subset_natural": len(self.in_idx), "others_natural": len(self.out_idx)}

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's half from the other classes and build its loader."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + int(epoch))
        drawn = self.out_idx[torch.randperm(len(self.out_idx), generator=g)[: self.n_out]]
        idx = torch.cat([self.in_idx, drawn])
        part = TensorData(self.data.train.x[idx], self.lut[self.data.train.y[idx]])
        self._loader = BatchLoader(part, batch_size=self.batch_size, train=True, mean=self.data.mean,
                                   std=self.data.std, scale=self.data.scale, augment=self.data.augment,
                                   device=self.device, seed=self.seed)
        self._loader.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil((len(self.in_idx) + self.n_out) / self.batch_size)

    def __iter__(self):
        return iter(self._loader)


# ----------------------------------------------------------------------------- logit correction


def dustbin_correction(subset_transfer: int, others_transfer: int, subset_natural: int, others_natural: int) -> float:
    """log of the proportion by which the subset was oversampled relative to the dustbin classes:
    ``log[(n_S' / n_R') / (n_S / n_R)]`` with n' the transfer-set counts and n the natural ones
    (Hinton et al. 2015, §5.2).

    This is the exact prior correction: a classifier trained where the priors are π' estimates
    posteriors proportional to p(x|c)·π'_c, so multiplying the dustbin's odds against the subset
    by (π_R/π_S)/(π'_R/π'_S) restores the natural priors. With a 50/50 transfer set it is
    log(n_R / n_S), which for a small subset is the paper's "log of the oversampling factor"
    0.5/π_S up to log 2."""
    if min(subset_transfer, others_transfer, subset_natural, others_natural) <= 0:
        raise InputError("dustbin correction: all four sample counts must be positive")
    return math.log((subset_transfer / others_transfer) / (subset_natural / others_natural))


def apply_dustbin_correction(specialist: nn.Module, correction: float, outputs: int) -> None:
    """Add ``correction`` to the dustbin (last) logit of ``specialist``'s head (``outputs`` = |S|+1)."""
    _, head = find_head(specialist, outputs)
    if head.bias is None:
        raise ModelError("specialists: the specialist's head has no bias to carry the dustbin correction")
    with torch.no_grad():
        head.bias[-1] += correction


# ----------------------------------------------------------------------------- soft targets


def specialist_soft_targets(generalist_logits: torch.Tensor, subset: Sequence[int], temperature: float,
                            dustbin_shift: float = 0.0) -> torch.Tensor:
    """The generalist's soft targets for a specialist, as log-probabilities [N, |S|+1].

    The generalist's full softmax ``p = softmax(z)`` over all K classes is restricted to the
    subset's classes (in ``subset`` order) plus the dustbin, which receives the summed probability
    of every other class: ``q = (p_S, Σ_{c∉S} p_c)``; then it is softened at temperature T,
    ``q_T = softmax(log q / T)``, the distribution a specialist's logits give at T. (Summing the
    *tempered* probabilities of the other classes instead would give the dustbin up to T·log(K−|S|)
    more log-odds than the dustbin has at T = 1: in a Fashion-MNIST check at T = 4 that taught
    the specialists an inflated dustbin and cost them 2-6 points of accuracy.)

    ``dustbin_shift`` (log-odds) re-weights the dustbin against the subset before softening: log q
    of the dustbin + ``dustbin_shift``, renormalised. Training passes ``−dustbin_correction``,
    which turns the generalist's posteriors (natural class mix) into those under the transfer set's
    mix (the subset oversampled), the mix the hard labels teach; the correction added to the
    dustbin logit after training then restores the natural mix for both."""
    subset = [int(c) for c in subset]
    k = generalist_logits.shape[1]
    rest = [c for c in range(k) if c not in set(subset)]
    log_p = torch.log_softmax(generalist_logits.float(), dim=1)
    dustbin = torch.logsumexp(log_p[:, rest], dim=1, keepdim=True) + float(dustbin_shift)
    return torch.log_softmax(torch.cat([log_p[:, subset], dustbin], dim=1) / float(temperature), dim=1)


def specialist_soft_loss(specialist_logits: torch.Tensor, target_log_probs: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """``T²·KL(q_g ‖ softmax(z_s/T))``, mean over the batch: the specialist's logits [N, |S|+1]
    against the generalist's soft targets ``q_g`` (log-probabilities, :func:`specialist_soft_targets`).
    T² keeps the soft-target gradients at the scale of the hard-label ones, as in KD (§2)."""
    t = float(temperature)
    log_q_s = torch.log_softmax(specialist_logits.float() / t, dim=1)
    return F.kl_div(log_q_s, target_log_probs, reduction="batchmean", log_target=True) * (t * t)


def specialist_objective(model: nn.Module, generalist: nn.Module, subset: Sequence[int], *, weight: float,
                         temperature: float, dustbin_shift: float = 0.0, label_smoothing: float = 0.0):
    """The step objective of :func:`kdcli.train.loop.fit` for one specialist:
    ``CE(z_s, y) + weight·T²·KL(q_g ‖ softmax(z_s/T))`` with ``y`` the specialist's labels
    (subset position or dustbin) and ``q_g`` the generalist's soft targets on the same batch
    (:func:`specialist_soft_targets`; the generalist runs without gradients)."""
    subset = [int(c) for c in subset]

    def objective(x, y, idx):
        logits = model(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        with torch.no_grad():
            target = specialist_soft_targets(generalist(x), subset, temperature, dustbin_shift)
        soft = specialist_soft_loss(logits, target, temperature)
        return ce + weight * soft, logits, {"ce": ce.detach(), "soft": soft.detach()}

    return objective


def train_specialist(generalist: nn.Module, subset: Sequence[int], data: DataBundle, cfg, *, device,
                     seed: int = 0, progress=None, soft_target_weight: float = SOFT_TARGET_WEIGHT,
                     soft_target_temperature: float = SOFT_TARGET_TEMPERATURE) -> tuple[nn.Module, dict]:
    """Build (:func:`specialist_from`), train and correct (:func:`dustbin_correction`) one
    specialist. Training is :func:`kdcli.train.loop.fit` with ``cfg`` a TrainSpec on
    :class:`SpecialistTransferLoader`, objective :func:`specialist_objective`: cross-entropy with
    the hard labels plus ``soft_target_weight`` times the soft-target term toward the generalist at
    ``soft_target_temperature``; weight 0 is plain cross-entropy.

    Why the soft term (Hinton et al. 2015, §6.1, "Using soft targets to prevent specialists from
    overfitting"): a specialist's training set is highly enriched in its special classes, so its
    effective size is small and it tends to overfit them; the paper's speech experiment (§6, 3 % of
    the data) shows soft targets retaining what hard targets alone lose, and it proposes training
    a specialist initialised from the generalist with the generalist's soft targets in addition to
    the hard ones. The paper's specialists in the JFT experiment used early stopping instead and
    §6.1 describes the soft targets for a full-softmax specialist; with kdcli's dustbin head the
    targets are the generalist's distribution with the non-special classes summed into the dustbin
    (:func:`specialist_soft_targets`), re-weighted to the transfer set's class mix so that the
    dustbin correction stays exact.

    Returns the specialist in eval mode and ``{"subset", "correction", "counts", "val_accuracy",
    "soft_target_weight", "soft_target_temperature"}`` (accuracy on the validation samples,
    specialist labels, with the natural class mix). The generalist is left in the mode it came in."""

    torch.manual_seed(seed)
    model = specialist_from(generalist, subset, data.num_classes).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    loader = SpecialistTransferLoader(data, subset, device=device, seed=seed)
    counts = loader.proportions()
    corr = dustbin_correction(**counts)
    objective = None
    was_training = generalist.training
    if soft_target_weight > 0:
        generalist.eval()
        objective = specialist_objective(model, generalist, loader.subset, weight=float(soft_target_weight),
                                         temperature=float(soft_target_temperature), dustbin_shift=-corr,
                                         label_smoothing=cfg.label_smoothing)
    try:
        fit(model, loader, cfg, objective=objective, device=device, progress=progress)
    finally:
        generalist.train(was_training)
    apply_dustbin_correction(model, corr, len(loader.subset) + 1)
    model.eval()
    x, y = data.eval_tensors("val", device)
    acc = None
    if len(x):
        y = loader.lut.to(y.device)[y]
        acc = evaluate(model, [(x[i:i + 512], y[i:i + 512]) for i in range(0, len(x), 512)], device)["accuracy"]
    return model, {"subset": loader.subset, "correction": corr, "counts": counts, "val_accuracy": acc,
                   "soft_target_weight": float(soft_target_weight),
                   "soft_target_temperature": float(soft_target_temperature)}


# ----------------------------------------------------------------------------- the combined model


class SpecialistEnsemble(nn.Module):
    """Generalist + specialists as one teacher: ``forward(x)`` [N, ...] → log q [N, K].

    For each sample the specialists whose subset holds one of the generalist's ``top_n`` most
    probable classes are active, and q is the KL combination (:mod:`kdcli.ensembles.combine`,
    ``steps`` gradient steps of size ``lr``). Every specialist runs on the whole batch and the
    inactive ones are masked out: simpler and batched, at the cost of computing unused outputs
    (the paper runs only the active ones, which matters with 61 specialists, not with a few).
    Samples with no active specialist get q = p^g exactly. log q are logits up to a constant,
    so Distiller, evaluate and export treat the ensemble like any model returning logits.

    ONNX: the combination is plain tensor ops in a loop of fixed length, which the
    torch.export-based exporter unrolls, so export works (checked against onnxruntime in the
    tests); the graph grows with ``steps``, and so does export time. Should an exporter reject
    a user's specialists, :func:`kdcli.export.onnx.export_onnx` raises ExportError naming both
    exporters' reasons."""

    def __init__(self, generalist: nn.Module, specialists: Sequence[nn.Module], subsets: Sequence[Sequence[int]],
                 num_classes: int, *, top_n: int = 1, steps: int = 50, lr: float = 1.0):
        super().__init__()
        if len(specialists) != len(subsets):
            raise InputError(f"specialists: {len(specialists)} models for {len(subsets)} subsets")
        self.generalist = generalist
        self.specialists = nn.ModuleList(specialists)
        self.subsets = [[int(c) for c in s] for s in subsets]
        self.num_classes, self.top_n, self.steps, self.lr = int(num_classes), int(top_n), int(steps), float(lr)
        if not 1 <= self.top_n <= self.num_classes:
            raise InputError(f"teacher.top_n: expected 1..{num_classes}, got {top_n}")
        member = torch.zeros(len(subsets), num_classes)
        columns = torch.empty(len(subsets), num_classes, dtype=torch.int64)
        for m, s in enumerate(self.subsets):
            member[m, s] = 1.0
            columns[m] = len(s)
            columns[m, s] = torch.arange(len(s))
        # not persistent: rebuilt from the subsets, so state dicts hold only the models' weights
        self.register_buffer("member", member, persistent=False)
        self.register_buffer("columns", columns, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_pg = torch.log_softmax(self.generalist(x).float(), dim=1)
        if len(self.specialists) == 0 or self.steps == 0:
            return log_pg
        top = log_pg.topk(self.top_n, dim=1).indices                            # [N, n]
        active = self.member.t()[top].amax(1)                                    # [N, M]
        p_m = torch.stack([expand_specialist(torch.log_softmax(s(x).float(), dim=1), self.columns[m])
                           for m, s in enumerate(self.specialists)], dim=1)      # [N, M, K]
        return combine_distributions(log_pg.exp(), p_m, self.member, active, steps=self.steps, lr=self.lr)
