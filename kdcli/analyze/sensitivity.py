"""Data-driven sensitivity: which features matter (activation sensitivity, the granularity map,
PCA redundancy) and how far each pruning group can be cut (the layer pruning-sensitivity scan).

Activation sensitivity (the adaptive-granularity design). For each tapped layer (by module path)
and each feature j (channel of an ``[N, C, H, W]`` map, neuron of an ``[N, D]`` vector):

- ``grad_std`` σ_j: the standard deviation, over inputs (and positions), of ∂z_ŷ/∂a_j, the
  gradient of the *predicted-class logit* z_ŷ with respect to the activation. The logit rather
  than the loss: it needs no labels, and it does not vanish on inputs the model already gets
  right with confidence (the cross-entropy gradient does, so a trained model would look
  insensitive exactly where it works best). The logit's gradient is the saliency of Simonyan et
  al. 2014, taken at a layer instead of the input.
- ``active_fraction`` f_j: the fraction of inputs and positions where a_j > 0 (1 − APoZ, Hu et
  al. 2016).
- ``sensitivity`` s_j = (σ_j / max σ) · f_j, divided by its maximum so that it lies in [0, 1].
  A product, so that a neuron that never fires (f = 0) is never critical however large its
  outgoing weights, and one whose influence never varies between inputs (σ = 0) is not either.
  When no feature's gradient varies at all (a model that predicts one class for every input,
  followed by a linear head), the mean |∂z_ŷ/∂a_j| stands in for σ, so the map still ranks.

The top ``critical_fraction`` of each layer's features (or those with s ≥ ``threshold``), among
those with s > 0, are flagged *critical*; :func:`granularity_map` turns this into the map
:mod:`kdcli.analyze.granularity` defines, read by ``compress`` (``distill.granularity``).

PCA redundancy: channels are the features and every (input, position) pair is a sample, so the
figure says how many directions in channel space the layer really uses; rows are subsampled to
at most ``max_rows`` with the seed.

Layer pruning sensitivity, in the manner of Distiller's sensitivity analysis (Zhu & Gupta 2017;
Han et al. 2015 §3) but over torch-pruning dependency groups: each group alone is pruned at each
ratio, top-1 is measured on the prepared validation batches, and the model is restored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from kdcli.errors import ModelError
from kdcli.analyze.granularity import GranularityMap, LayerGranularity
from kdcli.distill.taps import resolve_modules, unwrap
from kdcli.models.utils import eval_mode, first_tensor

PCA_LEVELS = (0.90, 0.95, 0.99)
WEIGHT_FLOOR = 0.1  # a feature's distillation weight never drops below this share of the mean


# ----------------------------------------------------------------------------- activation pass


@dataclass
class _Moments:
    """Running per-feature sums over (input, position) samples, in float64."""

    count: int = 0
    act_sum: torch.Tensor | None = None
    active: torch.Tensor | None = None
    grad_sum: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    grad_abs: torch.Tensor | None = None
    rows: list = field(default_factory=list)

    def add_activation(self, a: torch.Tensor) -> None:
        a = a.double()
        if self.act_sum is None:
            c = a.shape[1]
            self.act_sum, self.active = a.new_zeros(c), a.new_zeros(c)
            self.grad_sum, self.grad_sq, self.grad_abs = a.new_zeros(c), a.new_zeros(c), a.new_zeros(c)
        self.count += a.shape[0] * a.shape[2]
        self.act_sum += a.sum((0, 2))
        self.active += (a > 0).sum((0, 2)).double()

    def add_gradient(self, g: torch.Tensor) -> None:
        g = g.double()
        self.grad_sum += g.sum((0, 2))
        self.grad_sq += (g * g).sum((0, 2))
        self.grad_abs += g.abs().sum((0, 2))


def _per_feature(t: torch.Tensor) -> torch.Tensor:
    """``[N, C, *S]`` → ``[N, C, P]`` (P = positions; 1 for ``[N, C]``)."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def activation_statistics(model: nn.Module, batches: Sequence, layers: Sequence[str], *,
                          max_rows: int = 20_000, seed: int = 0,
                          advance: Callable[[int], None] | None = None) -> dict[str, dict]:
    """One forward and backward pass per batch of ``(x, ...)``; per tapped layer returns
    ``{"grad_std", "grad_mean_abs", "active_fraction", "mean_activation"}`` (float64 ``[C]``), ``"rows"``
    (``[R, C]`` activations for PCA, R ≤ ``max_rows``) and ``"shape"`` (one sample's output shape).

    Gradients are of the predicted-class logit (see the module docstring) and are taken with
    ``torch.autograd.grad`` with respect to the input, so no parameter's ``.grad`` is touched.
    The model runs in eval mode (BatchNorm uses its running statistics, so samples stay
    independent and one backward pass of the summed logits gives every sample's gradient).
    """
    model = unwrap(model)
    mods = resolve_modules(model, layers, "analysis layers", "model")
    stats = {p: _Moments() for p in layers}
    shapes: dict[str, list[int]] = {}
    n_batches = max(len(batches), 1)
    gen = torch.Generator().manual_seed(seed)

    def hook_for(path):
        def hook(_m, _inp, out):
            if path in seen:  # a module called twice: keep its first output, like FeatureTaps
                return
            seen.add(path)
            t = first_tensor(out)
            a = _per_feature(t.detach())
            stats[path].add_activation(a)
            shapes[path] = list(t.shape[1:])
            flat = a.permute(0, 2, 1).reshape(-1, a.shape[1])
            quota = max(1, max_rows // n_batches)
            if flat.shape[0] > quota:  # a seeded subsample of (input, position) rows for PCA
                idx = torch.randperm(flat.shape[0], generator=gen)[:quota].to(flat.device)
                flat = flat[idx]
            stats[path].rows.append(flat.float().cpu())
            if t.requires_grad:
                # Registered before any later in-place op, so it sees the gradient of this value.
                t.register_hook(lambda g, path=path: stats[path].add_gradient(_per_feature(g.detach())))
        return hook

    handles = [m.register_forward_hook(hook_for(p)) for p, m in mods.items()]
    try:
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                seen: set = set()
                x = batch[0].detach().clone().requires_grad_(True)
                logits = model(x)
                top = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
                torch.autograd.grad(top, [x], allow_unused=True)
                if advance is not None:
                    advance(1)
    finally:
        for h in handles:
            h.remove()

    out = {}
    for p, s in stats.items():
        if s.act_sum is None:
            continue
        # one check per layer after the pass (not a device sync per batch): NaN and inf stay in the sums
        if not bool(torch.isfinite(s.act_sum).all()):
            raise ModelError(f"layer {p}: activations hold NaN or infinite values (weights or inputs "
                             "too large for float32?)")
        n = max(s.count, 1)
        mean_g = s.grad_sum / n
        var_g = (s.grad_sq / n - mean_g * mean_g).clamp_min(0)
        out[p] = {"grad_std": var_g.sqrt().cpu(), "grad_mean_abs": (s.grad_abs / n).cpu(),
                  "active_fraction": (s.active / n).cpu(),
                  "mean_activation": (s.act_sum / n).cpu(), "rows": torch.cat(s.rows),
                  "shape": shapes[p]}
    return out


def combine_sensitivity(grad_std: torch.Tensor, active_fraction: torch.Tensor,
                        grad_mean_abs: torch.Tensor | None = None) -> torch.Tensor:
    """s = (σ / max σ) · f, rescaled to max 1 (σ → mean |gradient| when every σ is 0, if given);
    all zeros when no feature fires or matters. ``[C]``."""
    sigma = grad_std.double()
    if grad_mean_abs is not None and not bool((sigma > 0).any()):
        sigma = grad_mean_abs.double()
    s = sigma / sigma.max() if sigma.numel() and sigma.max() > 0 else torch.zeros_like(sigma)
    s = s * active_fraction.double()
    return s / s.max() if s.numel() and s.max() > 0 else s


def flag_critical(sensitivity: torch.Tensor, *, fraction: float | None = 0.1,
                  threshold: float | None = None) -> torch.Tensor:
    """Boolean ``[C]``: features with s ≥ ``threshold`` if given, else the top ``fraction``
    (at least one). A feature with s = 0 is never critical. Ties break by index (stable)."""
    s = sensitivity.double()
    if threshold is not None:
        return (s >= threshold) & (s > 0)
    k = min(s.numel(), max(1, math.ceil((fraction or 0.0) * s.numel())))
    order = torch.sort(-s, stable=True).indices[:k]
    crit = torch.zeros(s.numel(), dtype=torch.bool)
    crit[order] = True
    return crit & (s > 0)


def granularity_weights(sensitivity: torch.Tensor) -> torch.Tensor:
    """Per-feature distillation weights: proportional to ``WEIGHT_FLOOR + s``, mean 1 over the
    layer, so the loss keeps its scale and sensitive features count more. ``[C]``."""
    w = sensitivity.double() + WEIGHT_FLOOR
    return w / w.mean()


def granularity_map(activity: dict[str, dict], *, critical_fraction: float = 0.1,
                    threshold: float | None = None) -> GranularityMap:
    """The :class:`~kdcli.analyze.granularity.GranularityMap` of :func:`activation_statistics`' result:
    per layer, each feature's sensitivity, critical flag (coarse, pooled matching) and weight."""
    layers = {}
    for path, st in activity.items():
        s = combine_sensitivity(st["grad_std"], st["active_fraction"], st.get("grad_mean_abs"))
        crit = flag_critical(s, fraction=critical_fraction, threshold=threshold)
        layers[path] = LayerGranularity(sensitivity=[round(float(v), 6) for v in s],
                                        critical=[bool(v) for v in crit],
                                        weight=[round(float(v), 6) for v in granularity_weights(s)])
    return GranularityMap(layers)


def pca_redundancy(rows: torch.Tensor, levels: Iterable[float] = PCA_LEVELS) -> dict:
    """PCA of activations ``rows`` ``[R, C]`` (samples × channels; scikit-learn, full SVD).

    Returns ``{"features": C, "samples": R, "components": {"0.9": k, ...}, "cumulative": [...]}``
    where k is the fewest principal components that explain that share of the variance and
    ``cumulative`` the explained-variance curve. A layer with no variance needs 0 components."""
    from sklearn.decomposition import PCA

    r, c = rows.shape
    out = {"features": int(c), "samples": int(r), "components": {}, "cumulative": []}
    x = rows.double().numpy()
    if r < 2 or float(x.var(0).sum()) <= 1e-12:
        out["components"] = {str(q): 0 for q in levels}
        return out
    pca = PCA(svd_solver="full").fit(x)
    cum = pca.explained_variance_ratio_.cumsum()
    out["cumulative"] = [round(float(v), 5) for v in cum]
    for q in levels:
        out["components"][str(q)] = int(min(len(cum), int((cum < q - 1e-9).sum()) + 1))
    return out


# ----------------------------------------------------------------------------- groups and scan


def _widths(m: nn.Module) -> tuple:
    """The channel-like sizes of a module, to see which sizes a trial pruning changed."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return (m.in_channels, m.out_channels)
    if isinstance(m, nn.Linear):
        return (m.in_features, m.out_features)
    return tuple(tuple(t.shape) for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])


def group_layers(pruner, model: nn.Module) -> dict[str, dict[str, list]]:
    """Which layers each prunable group touches, found by pruning its last channel in a trial
    (no re-tracing) and seeing which modules changed size: ``{"out": [...]}`` conv/linear layers
    whose output channels shrink, ``"in"`` those whose input shrinks by one per channel (their
    input is the group's activation), ``"in_other"`` consumers fed a flattened map (many inputs
    per channel), ``"norm"`` the other layers with parameters (BatchNorm, ...)."""
    before = {n: _widths(m) for n, m in model.named_modules()}
    out = {}
    for g, n in pruner.group_channels().items():
        info = {"out": [], "in": [], "in_other": [], "norm": []}
        if n >= 2:
            with pruner.trial({g: [n - 1]}, check=False):
                for name, m in model.named_modules():
                    now = _widths(m)
                    if now == before.get(name):
                        continue
                    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                        if now[1] != before[name][1]:
                            info["out"].append(name)
                        if now[0] != before[name][0]:
                            info["in" if before[name][0] - now[0] == 1 else "in_other"].append(name)
                    elif now:
                        info["norm"].append(name)
        out[g] = info
    return out


def consumer_statistics(model: nn.Module, batches: Sequence, consumers: dict[str, str]) -> dict[str, dict]:
    """Mean activation and APoZ (average percentage of zeros, Hu et al. 2016) per channel of each
    group, measured at the input of its consumer layer ``consumers[group]`` (a conv/linear path),
    where the group's channels arrive after their BatchNorm and activation. ``[C]`` lists."""
    mods = resolve_modules(model, sorted(set(consumers.values())), "analysis consumers", "model")
    acc: dict[str, list] = {}

    def hook_for(path):
        def hook(m, inputs, _out):
            a = inputs[0].detach()
            a = a.reshape(-1, a.shape[-1]).T if isinstance(m, nn.Linear) else _per_feature(a).transpose(0, 1).reshape(a.shape[1], -1)
            s = acc.setdefault(path, [0.0, 0.0, 0])
            s[0] = s[0] + a.double().sum(1)
            s[1] = s[1] + (a == 0).double().sum(1)
            s[2] += a.shape[1]
        return hook

    handles = [m.register_forward_hook(hook_for(p)) for p, m in mods.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                model(batch[0])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for g, path in consumers.items():
        if path in acc:
            total, zeros, n = acc[path]
            out[g] = {"mean_activation": (total / max(n, 1)).tolist(), "apoz": (zeros / max(n, 1)).tolist()}
    return out


def pruning_sensitivity(pruner, groups: Sequence[str], scores: dict[str, torch.Tensor],
                        ratios: Sequence[float], *, evaluate_fn: Callable[[], float],
                        macs_fn: Callable[[], int], advance: Callable[[int], None] | None = None) -> dict:
    """Prune each of ``groups`` alone at each ratio (lowest ``scores`` first), measure top-1 with
    ``evaluate_fn()`` and the MACs with ``macs_fn()``, restore. Returns
    ``{group: [{"ratio", "channels_removed", "accuracy", "macs"}, ...]}``.

    The dependency graph is traced once (by ``pruner``); each point is a ``pruner.trial`` that
    prunes in place and restores the module attributes afterwards. A ratio whose plan equals the
    previous ratio's (small groups round to the same channel count) reuses its result."""
    curves: dict[str, list] = {}
    for g in groups:
        rows, last_plan, last = [], None, None
        for r in ratios:
            plan = pruner.plan_ratios({g: float(r)}, scores)
            if plan == last_plan and last is not None:
                acc, macs = last
            else:
                with pruner.trial(plan):
                    acc, macs = float(evaluate_fn()), int(macs_fn())
            last_plan, last = plan, (acc, macs)
            rows.append({"ratio": float(r), "channels_removed": len(plan.get(g, [])), "accuracy": acc, "macs": macs})
            if advance is not None:
                advance(1)
        curves[g] = rows
    return curves


def suggest_ratios(curves: dict[str, list[dict]], *, baseline_accuracy: float, total_macs: int,
                   target_macs: float, macs_of: Callable[[dict[str, float]], int] | None = None) -> dict:
    """Per-group pruning ratios predicted to reach ``target_macs`` (a fraction of ``total_macs``
    when ≤ 1, else an absolute count) with the least predicted accuracy loss.

    Prediction: each group's accuracy loss and MACs saving at a ratio are read off its own
    curve, and losses add up over groups. MACs: ``macs_of(ratios)`` when given (analyze passes
    the pruner's exact count of the combined plan), else the savings add up too, which
    overstates them where pruned groups feed each other (a layer between two pruned groups
    loses input and output channels: (1 − r1)(1 − r2) of its MACs remain, not 1 − r1 − r2).
    Greedy: starting from nothing pruned, repeatedly raise one group to the next ratio of its
    curve: the group whose step adds the smallest loss per MAC saved on its curve (a loss below
    zero counts as zero; ties go to the larger saving, then the group name), until the predicted
    MACs reach the target or no group can move. One step at a time, so the result overshoots
    the target by at most one step of one group. Groups left at ratio 0 are not in ``ratios``."""
    goal = target_macs * total_macs if target_macs <= 1 else float(target_macs)
    at = {g: (0.0, baseline_accuracy, total_macs) for g in curves}  # (ratio, accuracy, macs)
    predicted = float(total_macs)
    while predicted > goal:
        best = None
        for g in sorted(curves):
            r0, a0, m0 = at[g]
            # the next ratio that removes more (small groups round several ratios to one count)
            p = next((q for q in sorted(curves[g], key=lambda q: q["ratio"]) if q["ratio"] > r0 and q["macs"] < m0),
                     None)
            if p is None:
                continue
            saved = m0 - p["macs"]
            key = (max(a0 - p["accuracy"], 0.0) / saved, -saved, g)
            if best is None or key < best[0]:
                best = (key, g, p)
        if best is None:
            break
        _, g, p = best
        at[g] = (p["ratio"], p["accuracy"], p["macs"])
        if macs_of is None:
            predicted = total_macs - sum(total_macs - m for _, _, m in at.values())
        else:
            predicted = float(macs_of({k: r for k, (r, _, _) in at.items() if r > 0}))
    loss = sum(max(baseline_accuracy - a, 0.0) for r, a, _ in at.values() if r > 0)
    return {"target_macs": float(target_macs),
            "ratios": {g: r for g, (r, _, _) in at.items() if r > 0},
            "predicted_macs": int(round(predicted)),
            "predicted_macs_fraction": predicted / total_macs if total_macs else 1.0,
            "predicted_accuracy": baseline_accuracy - loss,
            "reached": predicted <= goal,
            "method": "greedy: smallest predicted accuracy loss per MAC saved, one ratio step at a time; "
                      "losses add over groups; MACs " + ("counted for the combined plan" if macs_of else
                                                         "savings add over groups")}
