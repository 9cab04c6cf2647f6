"""Structured channel pruning: everything in kdcli that calls torch-pruning.

Torch-pruning (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning") traces the model
once into a dependency graph and partitions its channels into *groups*: channels that must be
removed together (a conv's filters, the BatchNorm after it, the next conv's input slices, every
layer tied to them by a residual addition, ...). A group is named after the module path of its
root layer (``layer1.0.conv1``) and pruned as a unit.

:class:`StructuredPruner` wraps one traced graph:

- ``score`` gives each group's channels an importance (the criteria live in
  :mod:`kdcli.prune.importance`), normalised within the group (divided by the group's mean) so that
  one threshold τ applies to all groups;
- ``plan_below(scores, τ)`` lists the channels under τ, ``tau_for_macs`` finds the τ that reaches
  a MACs budget, ``apply`` prunes in place and checks the forward pass;
- ``trial(plan)`` prunes temporarily and restores the model afterwards, without tracing again:
  the sensitivity scan of analysis uses it (prune group g at ratio r, evaluate, restore), and so
  does ``plan_macs``.

Zero-padding shortcuts (option-A CIFAR ResNets: a strided slice of the block input with zero
channels added) are found by probing and replaced by :class:`kdcli.prune.couplings.ChannelPadShortcut`,
whose customized torch-pruning pruner couples input channel ``i`` with output channel ``left + i``:
a stage's residual channels are then pruned together with the next stages' channels they feed.
Groups are torch-pruning's, split by coupling: channels of one root layer that reach different
sets of layers (a stage's own residual channels, its zero-padded channels, which exist only
downstream) form separate groups, each named after a layer all of its channels pass through.

Other couplings torch-pruning does not understand are found by a probe: for each group, the
forward pass of the model with one channel pruned must equal the forward pass with that
channel's producers zeroed. Groups that fail are kept out of pruning and ``notes`` says so in
one line.

The pruning history (``history()``) is torch-pruning's own list of ``[root module, is output
channel, indices]``, in plain Python types so that ``torch.load(weights_only=True)`` reads it;
``replay_history`` rebuilds the pruned structure on a freshly built model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn

from kdcli.config.importance import NEEDS_DATA
from kdcli.errors import InputError, ModelError
from kdcli.prune.couplings import build_graph, replace_channel_pad_shortcuts
from kdcli.prune.heads import attention_heads, head_units, sync_head_counts
from kdcli.prune.importance import (IMPORTANCES, ROOT_TYPES, group_importance, mean_over_ranks)
from kdcli.models.utils import eval_mode, first_tensor

# Probe verdicts by model structure: compress creates one pruner per step on the same model.
_PROBE_CACHE: dict[tuple, frozenset] = {}


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """MACs per sample and parameter count, with torch-pruning's counter.

    ``example``: one input batch, e.g. ``(1, C, H, W)``. The counter (``tp.utils.count_ops_and_params``)
    counts module ops: conv/linear multiply-accumulates plus their bias adds, BatchNorm (2 per
    element), activation and pooling modules (1 per element); functional calls (``F.relu``) are
    free. It works on a copy, so the model's train/eval mode and BatchNorm statistics are unchanged.
    """
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(round(float(macs))), int(params)


def _output_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """Module path of the layer producing the logits: the one whose output *is* the model's
    output, else the last conv/linear whose output has the output's shape."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, o)))
             for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)]
    try:
        with eval_mode(model), torch.no_grad():
            out = first_tensor(model(example))
    finally:
        for h in hooks:
            h.remove()
    for name, o in reversed(seen):
        if o is out:
            return name
    for name, o in reversed(seen):
        if isinstance(o, torch.Tensor) and o.shape == out.shape:
            return name
    return None


def _copy_attrs(attrs: dict) -> dict:
    return {k: (dict(v) if k in ("_parameters", "_buffers") else list(v) if isinstance(v, list) else v)
            for k, v in attrs.items()}


class _Snapshot:
    """What pruning changes in place: module attributes (parameters, buffers, channel counts),
    the state of torch-pruning's placeholder ops (concat sizes, slice bounds) and the graph's
    bookkeeping. Restoring it undoes any pruning done since, without tracing the model again.
    Parameter dicts are restored in place (their identity is kept), hook dicts are left alone
    so that hook handles stay valid."""

    def __init__(self, dg: tp.DependencyGraph, model: nn.Module):
        mods = {id(m): m for m in model.modules()}
        for node in dg.module2node.values():
            if isinstance(node.module, nn.Module):
                mods.setdefault(id(node.module), node.module)
        self.dg = dg
        self.mods = [(m, _copy_attrs(m.__dict__)) for m in mods.values()]
        self.nodes = [(node, node.module) for node in dg.module2node.values()]
        self.module2node = dict(dg.module2node)
        self.param_to_name = dict(dg._param_to_name)
        self.history_len = len(dg._pruning_history)

    def restore(self) -> None:
        for m, saved in self.mods:
            for k in [k for k in m.__dict__ if k not in saved]:
                del m.__dict__[k]
            for k, v in _copy_attrs(saved).items():
                if k in ("_parameters", "_buffers"):
                    m.__dict__[k].clear()
                    m.__dict__[k].update(v)
                else:
                    m.__dict__[k] = v
        for node, module in self.nodes:
            node.module = module
        self.dg.module2node = dict(self.module2node)
        self.dg._param_to_name = dict(self.param_to_name)
        del self.dg._pruning_history[self.history_len:]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


class StructuredPruner:
    """Channel pruning of ``model`` through one torch-pruning dependency graph.

    ``example``: an input batch for tracing (e.g. ``torch.zeros(1, C, H, W)`` on the model's
    device). ``importance``: magnitude (group L2 norm, Li et al. 2017 / Fang et al. 2023), taylor
    (first-order Taylor, Molchanov et al. 2019), activation (mean |activation| entering the
    consumers, cf. APoZ of Hu et al. 2016) or bn-scale (|γ| of BatchNorm, Liu et al. 2017,
    "Network Slimming"). ``ignored_layers``: module paths whose groups are never pruned (a
    container path covers its submodules); the output layer is always ignored. ``round_to``:
    channel counts left are multiples of it (8 suits CPU kernels).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, *, importance: str = "magnitude",
                 ignored_layers: Sequence[str] = (), round_to: int | None = None):
        if importance not in IMPORTANCES:
            raise InputError(f"prune.importance: expected one of {', '.join(IMPORTANCES)}, got {importance!r}")
        if round_to is not None and int(round_to) < 1:
            raise InputError(f"prune.round_to: expected a positive integer, got {round_to}")
        self.model, self.example, self.importance = model, example, importance
        self.round_to = int(round_to) if round_to else None
        self.notes: list[str] = []
        self.shortcuts = replace_channel_pad_shortcuts(model, example)  # before anything looks at modules
        if self.shortcuts:
            shown = ", ".join(self.shortcuts[:4]) + (", ..." if len(self.shortcuts) > 4 else "")
            self.notes.append(f"{len(self.shortcuts)} zero-padding shortcut{'s' if len(self.shortcuts) != 1 else ''} "
                              f"({shown}) coupled: residual channels are pruned together with the channels they feed")
        modules = dict(model.named_modules())
        ignored: list[nn.Module] = []
        for name in ignored_layers:
            if name not in modules or name == "":
                raise InputError(f"prune.ignored_layers: no module {name!r} in the model")
            ignored += list(modules[name].modules())
        out_name = _output_layer(model, example)
        if out_name is not None:
            ignored.append(modules[out_name])
        self._ignored = ignored
        self._heads = attention_heads(model)  # qkv -> head_dim, before anything is pruned
        self.dg = build_graph(model, example)
        with eval_mode(model), torch.no_grad():
            self._out_shape = first_tensor(model(example)).shape
        self._excluded: frozenset = frozenset()
        self._refresh_groups()
        key = (type(model).__module__, type(model).__qualname__, out_name, tuple(self._groups),
               tuple((n, type(m).__qualname__) for n, m in model.named_modules()))
        if key in _PROBE_CACHE:
            self._excluded = _PROBE_CACHE[key]
        else:
            bad, conclusive = self._probe()
            self._excluded = frozenset(bad)
            if conclusive:  # a probe these weights made non-finite says nothing of the structure
                if len(_PROBE_CACHE) > 64:
                    _PROBE_CACHE.clear()
                _PROBE_CACHE[key] = self._excluded
        if self._excluded:
            bad = [n for n in self._groups if n in self._excluded]
            shown = ", ".join(bad[:6]) + (", ..." if len(bad) > 6 else "")
            self.notes.append(f"{len(bad)} group{'s' if len(bad) != 1 else ''} kept out of pruning: couplings "
                              f"torch-pruning does not understand ({shown}); the others are pruned")
            self._refresh_groups()

    # --- groups ---------------------------------------------------------------------------------
    def _refresh_groups(self) -> None:
        """Enumerate the prunable groups of the model as it is now: ``self._groups`` (name ->
        torch-pruning group of all the group's channels, ``root_idxs`` numbered 0..n-1 in the
        order of ``self._roots[name]``, the root layer's output channels of the group) and
        ``self._units`` (name -> the positions in ``_roots[name]`` of each pruning unit: one
        channel each, or for an attention ``qkv`` group one head each, see :mod:`kdcli.prune.heads`)."""
        self._groups: dict[str, tp.dependency.Group] = {}
        self._roots: dict[str, list[int]] = {}
        self._units: dict[str, list[list[int]]] = {}
        for name, module, chans in _partition_groups(self.dg, self._ignored):
            if name in self._excluded:
                continue
            handler = self.dg.get_pruner_of_module(module).prune_out_channels
            group = self.dg.get_pruning_group(module, handler, chans)
            pos = {c: k for k, c in enumerate(chans)}
            for item in group:
                item.root_idxs = [pos.get(r) if r is not None else None for r in item.root_idxs]
            self._groups[name], self._roots[name] = group, list(chans)
            hd = self._heads.get(module)
            self._units[name] = head_units(chans, module, hd) if hd else [[k] for k in range(len(chans))]

    def _names(self) -> str:
        names = list(self._groups)
        return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

    @property
    def groups(self) -> list[str]:
        """Names (root module paths) of the groups that may be pruned, in graph order."""
        return list(self._groups)

    def group_channels(self) -> dict[str, int]:
        """Units per prunable group, as the model is now: channels, or heads for an attention
        group (:meth:`unit`); plans and scores index these units."""
        return {name: len(u) for name, u in self._units.items()}

    def unit(self, name: str) -> str:
        """What group ``name`` prunes one at a time: ``"head"`` or ``"channel"``."""
        return "head" if self._is_heads(name) else "channel"

    def _is_heads(self, name: str) -> bool:
        return self._groups[name][0].dep.target.module in self._heads

    def round_of(self, name: str) -> int:
        """The block a group's width is a multiple of: ``round_to`` (1 without it); 1 for heads."""
        return 1 if self._is_heads(name) else (self.round_to or 1)

    def channels_at(self, name: str, path: str) -> list[int] | None:
        """The channels of layer ``path`` that group ``name``'s channels 0..n-1 are, in that order:
        its input channels where the group feeds it (a consumer), else its output channels. A
        group need not cover a whole layer (a stage's zero-padded channels are part of the next
        stage's layers), so per-channel figures measured at a layer are read through this. None
        when the group does not reach the layer one channel each (not at all, or through a flatten)."""
        if name not in self._groups:
            raise InputError(f"prune: no prunable group {name!r} (groups: {self._names()})")
        if self._is_heads(name):
            return None
        layer = dict(self.model.named_modules()).get(path)
        items = [it for it in self._groups[name] if it.dep.target.module is layer]
        items.sort(key=lambda it: not (self.dg.is_in_channel_pruning_fn(it.dep.handler)
                                       and not self.dg.is_out_channel_pruning_fn(it.dep.handler)))
        n = len(self._groups[name][0].idxs)
        for it in items[:1]:
            pairs = sorted(zip(it.root_idxs, it.idxs), key=lambda p: (p[0] is None, p[0] or 0))
            if len(pairs) == n and [p[0] for p in pairs] == list(range(n)):
                return [int(i) for _, i in pairs]
        return None

    def _root_channels(self, name: str, idxs: Sequence[int]) -> list[int]:
        """The root layer's output channels of units ``idxs`` (positions 0..n-1) of group ``name``."""
        chans, units = self._roots[name], self._units[name]
        return sorted(chans[p] for i in idxs for p in units[int(i)])

    def _group_of(self, name: str, idxs: Sequence[int]):
        """The torch-pruning group of units ``idxs`` (positions 0..n-1) of group ``name``."""
        dep = self._groups[name][0].dep
        return self.dg.get_pruning_group(dep.target.module, dep.handler, self._root_channels(name, idxs))

    def _probe(self) -> tuple[list[str], bool]:
        """Groups whose pruning torch-pruning gets wrong: pruning one channel must give the same
        output as zeroing that channel's producers (conv/linear filters, norm scales and shifts),
        which makes the channel zero wherever the group says it flows. Also returns whether the
        answer is about the structure alone: not when these weights gave non-finite outputs."""
        gen = torch.Generator().manual_seed(0)
        x = self.example
        if x.is_floating_point():  # a random input: a zero one leaves fresh BatchNorm nets all zero
            x = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        bad, conclusive = [], True
        with eval_mode(self.model), torch.no_grad():
            snap = _Snapshot(self.dg, self.model)
            for name in self._groups:
                n = len(self._units[name])
                if n < 2:
                    continue
                try:
                    one = self._group_of(name, [n - 1])
                    _zero_producers(self.dg, one)
                    masked = first_tensor(self.model(x))
                    conclusive = conclusive and bool(torch.isfinite(masked).all())
                    one.prune(record_history=False)
                    sync_head_counts(self.model, self._heads)
                    pruned = first_tensor(self.model(x))
                    ok = (pruned.shape == masked.shape and bool(torch.isfinite(masked).all())
                          and float((pruned - masked).abs().max()) <= 1e-3 * (float(masked.abs().max()) + 1e-6))
                except Exception:  # noqa: BLE001 - any failure means torch-pruning got it wrong
                    ok = False
                finally:
                    snap.restore()
                if not ok:
                    bad.append(name)
        return bad, conclusive

    # --- importance -----------------------------------------------------------------------------
    def score(self, batches: Iterable | None = None, importance: str | None = None) -> dict[str, torch.Tensor]:
        """Per-group channel importance: ``{group: float CPU tensor of shape (channels,)}``.

        Each group's raw scores (reduced over its layers by torch-pruning's group importance)
        are divided by the group's mean, so a channel scoring 1.0 is average for its group and
        one threshold compares across groups. ``batches``: ``(x, y, ...)`` tuples on the model's
        device, needed by taylor (gradients of cross-entropy summed over them) and activation.
        Groups a criterion cannot score (bn-scale without BatchNorm) fall back to magnitude.
        ``importance`` overrides the pruner's criterion for this call (``magnitude-l1``: the L1
        norm instead of L2).
        """
        crit = importance or self.importance
        if crit not in IMPORTANCES:
            raise InputError(f"prune.importance: expected one of {', '.join(IMPORTANCES)}, got {crit!r}")
        batches = list(batches) if batches is not None else []
        if crit in NEEDS_DATA and not batches:
            raise InputError(f"prune.importance: {crit} scores channels from data; no batches were given")
        with eval_mode(self.model):
            raw = group_importance(self.model, self.dg, self._groups, crit, batches)
            missing = [n for n, s in raw.items() if s is None]
            if missing:
                raw.update(group_importance(self.model, self.dg, {n: self._groups[n] for n in missing}, "magnitude"))
                note = f"{crit}: {len(missing)} group(s) without what it scores were scored by magnitude"
                if note not in self.notes:
                    self.notes.append(note)
        if crit in NEEDS_DATA:
            raw = mean_over_ranks(raw)
        out = {}
        for name, s in raw.items():
            s = torch.nan_to_num(s.detach().float().cpu(), nan=0.0, posinf=0.0)
            if self._is_heads(name):  # a head scores the sum over its rows of q, k and v
                s = torch.stack([s[u].sum() for u in self._units[name]])
            mean = float(s.mean()) if s.numel() else 0.0
            out[name] = s / mean if mean > 0 else torch.zeros_like(s)
        return out

    # --- plans ----------------------------------------------------------------------------------
    def _keep(self, n: int, remove: int, r: int) -> int:
        """Units left when ``remove`` units qualify: at least one (``r``, the group's
        :meth:`round_of`), rounded up to a multiple of ``r``; groups no larger than ``r`` stay whole."""
        if remove <= 0 or n <= 1 or (r > 1 and n <= r):
            return n
        keep = max(n - remove, r)
        return min(n, math.ceil(keep / r) * r)

    def _check_scores(self, scores: dict) -> None:
        for name, s in scores.items():
            if name not in self._groups:
                raise InputError(f"prune: no prunable group {name!r} (groups: {self._names()})")
            if len(s) != len(self._units[name]):
                raise InputError(f"prune: scores of group {name!r} have {len(s)} entries, the group "
                                 f"{len(self._units[name])} {self.unit(name)}s; score the model as it is now")

    def plan_below(self, scores: dict[str, torch.Tensor], tau: float) -> dict[str, list[int]]:
        """Channels to remove per group: those scoring below ``tau``, lowest first, within the
        ``round_to`` and keep-one rules (a group is never emptied)."""
        self._check_scores(scores)
        plan = {}
        for name, s in scores.items():
            s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
            n = len(s)
            remove = n - self._keep(n, int((s < tau).sum()), self.round_of(name))
            if remove > 0:
                order = torch.sort(s, stable=True).indices
                plan[name] = sorted(int(i) for i in order[:remove])
        return plan

    def plan_ratios(self, ratios: dict[str, float], scores: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """Channels to remove per group for a fraction of each group's channels (lowest scores
        first, rounded to the nearest channel, then the ``round_to`` and keep-one rules)."""
        plan = {}
        for name, ratio in ratios.items():
            if name in self._excluded:
                note = f"ratio for {name} ignored: its group is kept out of pruning"
                if note not in self.notes:
                    self.notes.append(note)
                continue
            if name not in self._groups:
                raise InputError(f"prune ratios: no prunable group {name!r} (groups: {self._names()})")
            if not 0 <= float(ratio) < 1:
                raise InputError(f"prune ratios: ratio of {name!r} must be in [0, 1), got {ratio}")
            if name not in scores:
                raise InputError(f"prune ratios: no scores for group {name!r}; score the model first")
            self._check_scores({name: scores[name]})
            s = torch.as_tensor(scores[name], dtype=torch.float64).reshape(-1)
            n = len(s)
            remove = n - self._keep(n, int(round(float(ratio) * n)), self.round_of(name))
            if remove > 0:
                plan[name] = sorted(int(i) for i in torch.sort(s, stable=True).indices[:remove])
        return plan

    def plan_macs(self, plan: dict[str, list[int]]) -> int:
        """MACs of the model after ``plan``, measured exactly by pruning in place and restoring
        (about 0.05 s for ResNet-56 on CPU); the model is left unchanged."""
        if not any(plan.values()):
            return count_macs_params(self.model, self.example)[0]
        with self.trial(plan, check=False):
            return count_macs_params(self.model, self.example)[0]

    def tau_for_macs(self, scores: dict[str, torch.Tensor], aim_macs: float) -> float:
        """The smallest τ whose ``plan_below`` brings MACs to ``aim_macs`` or below (bisection over
        the distinct scores, ~log2(channels) MAC counts); the largest useful τ if the aim is
        out of reach, the lowest score if the model already meets it."""
        self._check_scores(scores)
        values = sorted({float(v) for s in scores.values() for v in torch.as_tensor(s).reshape(-1).tolist()})
        if not values:
            return 0.0
        # candidate i removes every channel scoring <= values[i-1]; candidate 0 removes none
        cands = [values[0]] + [math.nextafter(v, math.inf) for v in values]
        cache: dict[int, int] = {}

        def macs(i: int) -> int:
            if i not in cache:
                cache[i] = self.plan_macs(self.plan_below(scores, cands[i]))
            return cache[i]

        lo, hi = 0, len(cands) - 1
        if macs(lo) <= aim_macs:
            return cands[lo]
        if macs(hi) > aim_macs:
            return cands[hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if macs(mid) <= aim_macs:
                hi = mid
            else:
                lo = mid
        return cands[hi]

    def fill_to_macs(self, scores: dict[str, torch.Tensor], plan: dict[str, list[int]], aim_macs: float,
                     max_rounds: int = 256) -> dict[str, list[int]]:
        """``plan`` with removed channels given back, best-scoring first, while MACs stay at or
        below ``aim_macs``. One threshold moves in coarse steps where a channel is expensive (an
        early conv at full resolution, ``round_to`` blocks), so the plan ``tau_for_macs`` finds
        can land well below the aim; each round restores, in the group whose next block scores
        highest among those that still fit, ``round_to`` channels (1 without it, a group's
        whole remainder when fewer are left). Greedy, about one MAC count per group per round."""
        self._check_scores(scores)
        plan = {k: sorted(int(i) for i in v) for k, v in plan.items() if len(v)}
        blocked: set[str] = set()
        for _ in range(max_rounds):
            cands = []
            for name, idxs in plan.items():
                if name in blocked:
                    continue
                r = self.round_of(name)
                s = torch.as_tensor(scores[name], dtype=torch.float64).reshape(-1)
                removed = sorted(idxs, key=lambda i: float(s[i]), reverse=True)
                back = removed[:r] if len(removed) > r else removed
                cands.append((float(s[back].mean()), name, set(back)))
            if not cands:
                break
            _, name, back = max(cands, key=lambda c: c[0])
            trial = {**plan, name: [i for i in plan[name] if i not in back]}
            if self.plan_macs(trial) <= aim_macs:
                plan = {k: v for k, v in trial.items() if v}
            else:
                blocked.add(name)  # its next block does not fit; later blocks of it score lower
        return plan

    def take_to_macs(self, scores: dict[str, torch.Tensor], plan: dict[str, list[int]], aim_macs: float,
                     max_rounds: int = 256) -> dict[str, list[int]]:
        """``plan`` with more channels removed, a block (``round_to`` channels) at a time, until
        MACs are at or below ``aim_macs``: the way to the aim from above, for when the next
        threshold up takes a block so expensive (a residual stage's ``round_to`` channels) that
        giving channels back (:meth:`fill_to_macs`) cannot climb back near the aim. Each round
        takes the lowest-scoring next block that leaves MACs above the aim; when every block
        would cross it, the one that lands highest. Groups are never emptied."""
        self._check_scores(scores)
        plan = {k: sorted(int(i) for i in v) for k, v in plan.items() if len(v)}
        for _ in range(max_rounds):
            if self.plan_macs(plan) <= aim_macs:
                return plan
            cands = []
            for name in self._groups:
                if name in self._excluded:
                    continue
                r = self.round_of(name)
                s = torch.as_tensor(scores[name], dtype=torch.float64).reshape(-1)
                gone = set(plan.get(name, []))
                left = [i for i in torch.sort(s, stable=True).indices.tolist() if i not in gone]
                if len(left) <= r:  # a group keeps at least one block
                    continue
                take = left[:r]
                cands.append((float(s[take].mean()), name, take))
            if not cands:
                break
            crossing = []
            for _, name, take in sorted(cands, key=lambda c: c[0]):
                trial = {**plan, name: sorted(plan.get(name, []) + take)}
                macs = self.plan_macs(trial)
                if macs > aim_macs:
                    plan = trial
                    break
                crossing.append((macs, trial))
            else:
                return max(crossing, key=lambda c: c[0])[1]
        return plan

    def plan_for_macs(self, scores: dict[str, torch.Tensor], aim_macs: float) -> tuple[float, dict[str, list[int]]]:
        """(τ, plan) landing at or just below ``aim_macs``: the threshold plan of
        :meth:`tau_for_macs` with channels given back (:meth:`fill_to_macs`), or the plan of the
        next lower threshold with the lowest-scoring blocks taken away (:meth:`take_to_macs`),
        whichever keeps more MACs."""
        tau = self.tau_for_macs(scores, aim_macs)
        below = self.fill_to_macs(scores, self.plan_below(scores, tau), aim_macs)
        values = sorted({float(v) for sc in scores.values() for v in torch.as_tensor(sc).reshape(-1).tolist()
                         if float(v) < tau})
        if not values:
            return tau, below
        lower = self.plan_below(scores, values[-1])  # removes less: MACs above the aim
        return tau, self._nearer(below, self.take_to_macs(scores, lower, aim_macs), aim_macs)

    def _nearer(self, below: dict, above: dict, aim_macs: float) -> dict:
        """Of a plan reached by giving channels back and one reached by taking them away, the one
        that keeps more MACs while staying at or under ``aim_macs`` (``below`` on a tie)."""
        m_below, m_above = self.plan_macs(below), self.plan_macs(above)
        return above if m_below < m_above <= aim_macs else below

    def plan_uniform(self, scores: dict[str, torch.Tensor], aim_macs: float) -> tuple[float, dict[str, list[int]]]:
        """(ratio, plan): the same fraction of every prunable group's channels removed, lowest
        scores first (Torch-Pruning's default, "local" pruning; Li et al. 2017 prune each layer
        alike), the smallest ratio whose plan reaches ``aim_macs`` (bisection), then channels given
        back or taken away to land just under the aim (:meth:`fill_to_macs`, :meth:`take_to_macs`).
        Scores only rank channels within their group, so no normalisation across groups matters."""
        names = [g for g in self._groups if g not in self._excluded]
        lo, hi = 0.0, 0.99
        if self.plan_macs(self.plan_ratios({g: hi for g in names}, scores)) > aim_macs:
            plan = self.plan_ratios({g: hi for g in names}, scores)
            return hi, self.take_to_macs(scores, plan, aim_macs)
        for _ in range(20):
            mid = (lo + hi) / 2
            if self.plan_macs(self.plan_ratios({g: mid for g in names}, scores)) <= aim_macs:
                hi = mid
            else:
                lo = mid
        below = self.fill_to_macs(scores, self.plan_ratios({g: hi for g in names}, scores), aim_macs)
        above = self.take_to_macs(scores, self.plan_ratios({g: lo for g in names}, scores), aim_macs)
        return hi, self._nearer(below, above, aim_macs)

    # --- pruning --------------------------------------------------------------------------------
    def _prune(self, plan: dict[str, list[int]], record: bool) -> None:
        """Prune the groups of ``plan`` one after the other. Groups may share a root layer (a
        stage's channels and its zero-padded ones), so each group's root channels are renumbered
        for the channels earlier groups of the plan removed from that layer."""
        for name, idxs in plan.items():
            if name not in self._groups:
                raise InputError(f"prune: no prunable group {name!r} (groups: {self._names()})")
            n = len(self._units[name])
            if idxs and (len(set(idxs)) >= n or min(idxs) < 0 or max(idxs) >= n):
                raise InputError(f"prune: plan for group {name!r} must remove some, not all, of its {n} {self.unit(name)}s")
        roots = {name: self._groups[name][0].dep for name, idxs in plan.items() if idxs}
        alive = {dep.target.module: list(range(self.dg.get_out_channels(dep.target.module))) for dep in roots.values()}
        for name, dep in roots.items():
            layer, now = dep.target.module, alive[dep.target.module]
            group = self.dg.get_pruning_group(layer, dep.handler,
                                              sorted(now.index(c) for c in self._root_channels(name, plan[name])))
            for item in group:
                if item.dep.target.module in alive and self.dg.is_out_channel_pruning_fn(item.dep.handler):
                    gone = set(item.idxs)
                    kept = alive[item.dep.target.module]
                    kept[:] = [c for k, c in enumerate(kept) if k not in gone]
            group.prune(record_history=record)
        sync_head_counts(self.model, self._heads)

    def _check_forward(self) -> None:
        with eval_mode(self.model), torch.no_grad():
            shape = first_tensor(self.model(self.example)).shape
        if shape != self._out_shape:
            raise RuntimeError(f"output shape {list(shape)}, expected {list(self._out_shape)}")

    def _fail(self, plan: dict, exc: Exception) -> ModelError:
        names = ", ".join(list(plan)[:3]) + (", ..." if len(plan) > 3 else "")
        return ModelError(f"pruning groups {names} broke the model's forward pass ({_one_line(exc)}); "
                          "the model was restored; list those layers in prune.ignored_layers")

    @contextmanager
    def trial(self, plan: dict[str, list[int]], check: bool = True) -> Iterator[nn.Module]:
        """Prune ``plan`` temporarily: inside the block the model is pruned (use it, e.g.
        evaluate it), afterwards it is restored exactly, history included; the graph is not
        traced again. Sensitivity scan::

            for g in pruner.groups:
                with pruner.trial(pruner.plan_ratios({g: 0.5}, scores)):
                    acc[g] = evaluate(model, val)
        """
        snap = _Snapshot(self.dg, self.model)
        try:
            try:
                self._prune(plan, record=False)
                if check:
                    self._check_forward()
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported as a one-line ModelError
                raise self._fail(plan, exc) from exc
            yield self.model
        finally:
            snap.restore()

    def apply(self, plan: dict[str, list[int]]) -> None:
        """Prune ``plan`` (group → channel indices) in place, record it in the history and check
        the forward pass (same output shape); on failure the model is restored and ModelError raised."""
        plan = {k: list(v) for k, v in plan.items() if len(v)}
        if not plan:
            return
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        snap = _Snapshot(self.dg, self.model)
        try:
            self._prune(plan, record=True)
            self._check_forward()
        except InputError:
            snap.restore()
            raise
        except Exception as exc:  # noqa: BLE001 - reported as a one-line ModelError
            snap.restore()
            raise self._fail(plan, exc) from exc
        for n, p in self.model.named_parameters():  # pruned parameters are new tensors
            p.requires_grad_(flags.get(n, True))
        self._refresh_groups()

    def prune_ratios(self, ratios: dict[str, float], scores: dict[str, torch.Tensor]) -> None:
        """Remove a fraction of each named group's channels (lowest scores first) in place."""
        self.apply(self.plan_ratios(ratios, scores))

    def history(self) -> list[list]:
        """This pruner's pruning history, ``[[root module path, is_out_channel, [indices]], ...]`` in
        plain Python types; concatenated in order with earlier pruners' histories, it replays
        on a fresh model with :func:`replay_history`."""
        return [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in self.dg.pruning_history()]


def _partition_groups(dg: tp.DependencyGraph, ignored: Sequence[nn.Module]) -> list[tuple[str, nn.Module, list[int]]]:
    """The prunable groups of ``dg`` as ``(name, root layer, root output channels)``.

    Torch-pruning's ``get_all_groups`` builds one group per root layer not yet seen, with all of
    its channels, and counts a layer as seen once any group prunes any of its output channels.
    Through a coupling that maps channels (the zero-padding shortcut: stage channel ``c`` is
    channel ``c + pad`` of the next stage), a layer's channels need not share one group: the
    first group found (the stage's) covers some channels of the next stage's layers, whose other
    channels (the padding) would then belong to no group. Here coverage is counted per channel,
    and the channels a root layer leaves uncovered are split by the set of layers each reaches
    (its *coupling*); channels with the same coupling form a group. Each group is named after
    the layer of its coupling (conv/linear, not ignored) that takes part in the fewest groups,
    the first traced among equals: without such couplings, exactly torch-pruning's groups,
    names and order. A group reaching an ignored layer is not prunable, as in torch-pruning."""
    ignored_set = set(ignored) | set(dg.IGNORED_LAYERS_IN_TRACING)
    order = {m: k for k, m in enumerate(dg.module2node)}
    covered: set[tuple[int, int]] = set()
    classes: list[tuple[frozenset, nn.Module, list[int], object]] = []  # coupling, root, channels, its group
    for m in list(dg.module2node):
        if not isinstance(m, ROOT_TYPES) or m in ignored_set:
            continue
        pruner = dg.get_pruner_of_module(m)
        n = pruner.get_out_channels(m) if pruner is not None else None
        if n is None:
            continue
        free = [c for c in range(n) if (id(m), c) not in covered]
        if not free:
            continue
        group = dg.get_pruning_group(m, pruner.prune_out_channels, free)
        reach: dict[int, set] = {c: set() for c in free}
        for item in group:
            if not dg.is_out_channel_pruning_fn(item.dep.handler):
                continue
            layer = item.dep.target.module
            for idx, r in zip(item.idxs, item.root_idxs):
                covered.add((id(layer), idx))
                if r in reach:
                    reach[r].add(layer)
        by_coupling: dict[frozenset, list[int]] = {}
        for c in free:
            by_coupling.setdefault(frozenset(reach[c]), []).append(c)
        for coupling, chans in by_coupling.items():
            classes.append((coupling, m, chans, group))
    share: dict[nn.Module, int] = {}
    for coupling, *_ in classes:
        for layer in coupling:
            share[layer] = share.get(layer, 0) + 1
    out: dict[nn.Module, list[int]] = {}
    for coupling, m, chans, group in classes:
        if any(layer in ignored_set for layer in coupling):
            continue
        cands = sorted((layer for layer in coupling if isinstance(layer, ROOT_TYPES) and layer not in out
                        and layer in order), key=lambda layer: (share[layer], order[layer]))
        root, root_chans = m, chans
        for cand in cands:
            if cand is m:
                break
            mapped = _channels_at(dg, group, cand, set(chans))
            if mapped is not None and len(mapped) == len(chans):
                root, root_chans = cand, mapped
                break
        # a layer names one group: channels left without a layer of their own join the group of
        # the layer they were found from (mixed couplings, as torch-pruning's groups would have)
        out[root] = sorted(out.get(root, []) + list(root_chans))
    return [(dg._module2name[root], root, chans) for root, chans in out.items()]


def _channels_at(dg: tp.DependencyGraph, group, layer: nn.Module, roots: set) -> list[int] | None:
    """The output channels of ``layer`` that ``group``'s root channels ``roots`` prune."""
    for item in group:
        if item.dep.target.module is layer and dg.is_out_channel_pruning_fn(item.dep.handler):
            return sorted({idx for idx, r in zip(item.idxs, item.root_idxs) if r in roots})
    return None


def _zero_producers(dg: tp.DependencyGraph, group) -> None:
    """Replace the parameters producing the group's channels with copies whose slices for those
    channels are zero (the originals are untouched, so a snapshot restores them)."""
    for dep, idxs in group:
        m = dep.target.module
        if not dg.is_out_channel_pruning_fn(dep.handler) or not isinstance(m, nn.Module) or not idxs:
            continue
        for pname, p in list(m.named_parameters(recurse=False)):
            dim = 1 if pname == "weight" and getattr(m, "transposed", False) else 0
            if p.dim() == 0 or p.shape[dim] <= max(idxs):
                continue
            q = p.detach().clone()
            q.index_fill_(dim, torch.tensor(idxs, device=q.device), 0)
            setattr(m, pname, nn.Parameter(q, requires_grad=p.requires_grad))


def _check_history_indices(dg: tp.DependencyGraph, module: nn.Module, i: int, entry: tuple) -> None:
    """ModelError unless the entry's indices are distinct channels of ``module`` that leave at
    least one: torch-pruning would otherwise fail deep inside, or silently index out of range."""
    name, is_out, idxs = entry
    try:
        size = dg.get_out_channels(module) if is_out else dg.get_in_channels(module)
    except Exception:  # noqa: BLE001 - torch-pruning raises KeyError & co. for modules outside its graph
        size = None
    if size is None:
        raise ModelError(f"pruning history entry {i}: module {name!r} has no prunable channels")
    bad = [j for j in idxs if not 0 <= j < size]
    if bad or len(set(idxs)) != len(idxs) or len(idxs) >= size:
        what = (f"index {bad[0]} is out of range" if bad else
                "indices repeat" if len(set(idxs)) != len(idxs) else "it would remove every channel")
        raise ModelError(f"pruning history entry {i}: {what} for the {size} "
                         f"{'output' if is_out else 'input'} channels of {name!r}")


def replay_history(model: nn.Module, example: torch.Tensor, history: list) -> None:
    """Rebuild a pruned structure on a freshly built ``model`` by replaying ``history`` (entries
    ``[module path, is_out_channel, indices]``, as :meth:`StructuredPruner.history` writes them,
    concatenated in order) with torch-pruning's ``DependencyGraph.load_pruning_history``.
    Zero-padding shortcuts are first replaced as :class:`StructuredPruner` replaces them (the
    same probe, deterministic), so that the history prunes the same couplings.
    Weights are whatever the fresh model had; load the pruned state dict afterwards."""
    if not history:
        return
    entries = []
    for i, entry in enumerate(history):
        try:
            name, is_out, idxs = entry
            entries.append((str(name), bool(is_out), [int(j) for j in idxs]))
        except (TypeError, ValueError):
            raise ModelError(f"pruning history entry {i}: expected [module path, is_out_channel, [indices]], got {entry!r}") from None
    replace_channel_pad_shortcuts(model, example)  # as StructuredPruner did before pruning
    heads = attention_heads(model)  # head sizes of the unpruned blocks, to set plain num_heads after
    modules = dict(model.named_modules())
    dg = build_graph(model, example)
    for i, entry in enumerate(entries):
        if entry[0] not in modules:
            raise ModelError(f"pruning history entry {i}: no module {entry[0]!r} in the model")
        _check_history_indices(dg, modules[entry[0]], i, entry)
        try:
            dg.load_pruning_history([entry])
        except Exception as exc:  # noqa: BLE001 - torch-pruning raises assorted types
            raise ModelError(f"pruning history entry {i} ({entry[0]}) does not replay: {_one_line(exc)}") from exc
    dg._pruning_history = [list(e) for e in entries]
    sync_head_counts(model, heads)
