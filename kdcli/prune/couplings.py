"""Channel couplings torch-pruning does not trace by itself, made prunable.

Option-A shortcuts of CIFAR ResNets (He et al. 2016) subsample the block input and zero-pad its
channels, ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``, usually inside a ``LambdaLayer``
whose code nothing outside it can read. Torch-pruning traces the pad as an element-wise op, so
it gets the groups through such a shortcut wrong: channel ``c`` of the block input is channel
``c + p`` of its output, and the ``2p`` zero channels exist only downstream.

This module

- finds such shortcuts by probing, not by name: any parameter-free leaf module that is called
  once, with one tensor, and whose output on random inputs equals a strided slice of its input
  (start 0, one step per spatial dimension) with zero channels added before and after
  (:func:`find_channel_pad_shortcuts`);
- replaces each by :class:`ChannelPadShortcut`, which computes the same thing from plain
  numbers (steps, zero channels on the left and right, input channels) and exports to ONNX
  as the original does (Slice + Pad) (:func:`replace_channel_pad_shortcuts`);
- teaches torch-pruning the coupling (:func:`build_graph`): a customized pruner
  (:class:`ChannelPadPruner`, torch-pruning's ``customized_pruners`` API) whose
  ``prune_in_channels`` *is* its ``prune_out_channels`` (torch-pruning's intra-layer coupling),
  working in output-channel coordinates, plus an index mapping on the graph edges between the
  shortcut and its input (input channel ``i`` <-> output channel ``left + i``), the mechanism
  torch-pruning itself uses for ``torch.cat`` / ``split`` / slices.

Pruning keeps the layout a slice and a pad: an input channel and its output channel are always
removed together, so the kept input channels stay a contiguous block of the output, and only
the amounts of zero channels on each side change.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.pruner.function import BasePruningFunc

from kdcli.models.utils import eval_mode, first_tensor, grads_enabled


class ChannelPadShortcut(nn.Module):
    """``x[:, :, ::s1, ::s2, ...]`` with ``left`` zero channels before and ``right`` after.

    ``steps``: one subsampling step per spatial dimension (1: none). No parameters or buffers,
    so a model's state dict is the same with it as with the module it replaces."""

    def __init__(self, steps: Sequence[int], left: int, right: int, in_channels: int):
        super().__init__()
        self.steps = tuple(int(s) for s in steps)
        self.left, self.right, self.in_channels = int(left), int(right), int(in_channels)

    @property
    def out_channels(self) -> int:
        return self.left + self.in_channels + self.right

    @property
    def index(self) -> list[int]:
        """Output channel of each input channel."""
        return list(range(self.left, self.left + self.in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s != 1 for s in self.steps):
            x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in self.steps)]
        if self.left or self.right:
            x = F.pad(x, (0, 0) * len(self.steps) + (self.left, self.right))
        return x

    def extra_repr(self) -> str:
        return f"steps={self.steps}, left={self.left}, in_channels={self.in_channels}, right={self.right}"


class ChannelPadPruner(BasePruningFunc):
    """Torch-pruning pruner of :class:`ChannelPadShortcut`. Indices are output channels
    (the edges from the shortcut's input carry them there, see :func:`build_graph`): a zero
    channel shrinks its side's padding, an inner channel removes its input channel too."""

    TARGET_MODULES = (ChannelPadShortcut,)

    def prune_out_channels(self, layer: ChannelPadShortcut, idxs: Sequence[int]) -> nn.Module:
        idxs = set(int(i) for i in idxs)
        left, n = layer.left, layer.in_channels
        cut_left = sum(1 for i in idxs if i < left)
        cut_inner = sum(1 for i in idxs if left <= i < left + n)
        cut_right = len(idxs) - cut_left - cut_inner
        layer.left, layer.in_channels, layer.right = left - cut_left, n - cut_inner, layer.right - cut_right
        return layer

    prune_in_channels = prune_out_channels  # one function: torch-pruning couples input and output

    def get_out_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.in_channels


class _InputToOutput:
    """Index mapping on the edge input -> shortcut: input channel i is output channel left + i."""

    def __init__(self, module: ChannelPadShortcut):
        self.module = module

    def __call__(self, idxs):
        left = self.module.left
        return [_helpers._HybridIndex(idx=i.idx + left, root_idx=i.root_idx) for i in idxs]


class _OutputToInput:
    """Index mapping on the edge shortcut -> input: output channel j is input channel j - left,
    if it is one (a zero channel has no input)."""

    def __init__(self, module: ChannelPadShortcut):
        self.module = module

    def __call__(self, idxs):
        left, n = self.module.left, self.module.in_channels
        return [_helpers._HybridIndex(idx=i.idx - left, root_idx=i.root_idx) for i in idxs if left <= i.idx < left + n]


CUSTOMIZED_PRUNERS = {ChannelPadShortcut: ChannelPadPruner()}
_SPLITTING = (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND)


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-pruning's dependency graph of ``model`` with the couplings of this module: the
    customized pruner of :class:`ChannelPadShortcut` and the index mappings of its input edges.

    Torch-pruning applies an edge's ``index_mapping[0]`` then ``[1]``; ``update_index_mapping``
    (run before each group) rewrites only edges of concat/split/reshape/slice/... nodes: slot 1
    of the edge into the shortcut and slot 0 of the edge back are free, unless the input is a
    split or unbind output (which owns slot 0 both ways). Those are left unmapped: the pruner's
    probe then finds the group wrong and keeps it out of pruning."""
    with eval_mode(model), grads_enabled(model):
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                   customized_pruners=dict(CUSTOMIZED_PRUNERS))
    for module, node in dg.module2node.items():
        if not isinstance(module, ChannelPadShortcut):
            continue
        for in_node in node.inputs:
            if in_node.type in _SPLITTING:
                continue
            for dep in in_node.dependencies:
                if dep.target is node:
                    dep.index_mapping[1] = _InputToOutput(module)
            for dep in node.dependencies:
                if dep.target is in_node:
                    dep.index_mapping[0] = _OutputToInput(module)
    return dg


# --- detection --------------------------------------------------------------------------------

def _is_candidate(m: nn.Module) -> bool:
    return (not isinstance(m, ChannelPadShortcut) and next(m.children(), None) is None
            and next(m.parameters(recurse=False), None) is None and next(m.buffers(recurse=False), None) is None)


def _fit_pad(m: nn.Module, shape: torch.Size, dtype: torch.dtype, device: torch.device, out_shape: torch.Size,
             gen: torch.Generator) -> ChannelPadShortcut | None:
    """The ChannelPadShortcut computing what ``m`` does on inputs of ``shape``, found by calling it
    on two random inputs; None if it does something else."""
    n, c, spatial = shape[0], shape[1], tuple(shape[2:])
    c_out, spatial_out = out_shape[1], tuple(out_shape[2:])
    if out_shape[0] != n or c_out <= c or len(spatial_out) != len(spatial) or 0 in spatial_out:
        return None
    steps = tuple(math.ceil(s / so) for s, so in zip(spatial, spatial_out))
    if any(math.ceil(s / st) != so for s, st, so in zip(spatial, steps, spatial_out)):
        return None
    sub = (slice(None), slice(None)) + tuple(slice(None, None, st) for st in steps)
    fit = None
    for _ in range(2):
        x = torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)
        try:
            y = m(x)
        except Exception:  # noqa: BLE001 - a module that fails on a fresh input is not this
            return None
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(out_shape):
            return None
        xs = x[sub]
        if fit is None:  # where the first input channel landed
            hits = [k for k in range(c_out - c + 1) if torch.equal(y[:, k], xs[:, 0])]
            if len(hits) != 1:
                return None
            left = hits[0]
            fit = ChannelPadShortcut(steps, left, c_out - c - left, c)
        lo, hi = fit.left, fit.left + c
        if not (torch.equal(y[:, lo:hi], xs) and not y[:, :lo].any() and not y[:, hi:].any()):
            return None
    return fit


def find_channel_pad_shortcuts(model: nn.Module, example: torch.Tensor) -> dict[str, ChannelPadShortcut]:
    """``{module path: replacement}`` for every parameter-free leaf module of ``model`` that is
    a strided slice with zero channels added (see the module docstring), called once in a
    forward pass on ``example`` (batch, channels, *spatial)."""
    return _find(model, example)[0]


_Found = tuple[dict[str, ChannelPadShortcut], "torch.Tensor | None", "torch.Tensor | None"]


def _find(model: nn.Module, example: torch.Tensor) -> _Found:
    """:func:`find_channel_pad_shortcuts`, with the random input of its forward pass and the output."""
    cands = {name: m for name, m in model.named_modules() if name and _is_candidate(m)}
    if not cands or not example.is_floating_point():
        return {}, None, None
    calls: dict[str, list] = {name: [] for name in cands}

    def hook(name):
        def record(m, inputs, output):
            x = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], torch.Tensor) else None
            usable = x is not None and x.is_floating_point() and x.dim() >= 3 and isinstance(output, torch.Tensor)
            calls[name].append((x.shape, x.dtype, x.device, output.shape) if usable else None)
        return record

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(example.shape, generator=gen).to(example.device, example.dtype)
    handles = [m.register_forward_hook(hook(name)) for name, m in cands.items()]
    try:
        with eval_mode(model), torch.no_grad():
            out = first_tensor(model(x))
    except Exception:  # noqa: BLE001 - the pruner reports a model that does not run
        return {}, None, None
    finally:
        for h in handles:
            h.remove()
    found = {}
    with eval_mode(model), torch.no_grad():
        for name, seen in calls.items():
            if len(seen) != 1 or seen[0] is None:
                continue
            fit = _fit_pad(cands[name], *seen[0], gen)
            if fit is not None:
                found[name] = fit
    return found, x, out


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_channel_pad_shortcuts(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Replace, in place, the modules :func:`find_channel_pad_shortcuts` finds by their
    :class:`ChannelPadShortcut`; returns their paths. Deterministic (fixed random probes), so a
    freshly built model gets the same replacements before a pruning history is replayed. The
    replacements are undone unless the model then gives the same output, bit for bit, and calls
    every replacement (a module also reachable another way than its attribute would not be)."""
    found, x, ref = _find(model, example)
    if not found:
        return []
    old = {name: model.get_submodule(name) for name in found}
    for name, new in found.items():
        _set(model, name, new)
    called: set = set()
    handles = [m.register_forward_hook(lambda m, i, o: called.add(id(m))) for m in found.values()]
    try:
        with eval_mode(model), torch.no_grad():
            ok = torch.equal(first_tensor(model(x)), ref) and called == {id(m) for m in found.values()}
    except Exception:  # noqa: BLE001 - restored below
        ok = False
    finally:
        for h in handles:
            h.remove()
    if not ok:
        for name, m in old.items():
            _set(model, name, m)
        return []
    return list(found)
