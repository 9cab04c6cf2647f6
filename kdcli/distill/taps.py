"""Feature taps: collect intermediate outputs of any ``nn.Module`` by module path.

Layers are named by their dotted path, exactly as ``model.get_submodule`` takes it (``layer2``,
``features.4``, ``layer3.2.conv1``), so any model works unchanged: no wrapper classes, no
``forward`` that returns features. Hooks exist only inside a ``with FeatureTaps(...)`` block, so
that the student, once distilled, is saved and exported exactly as it was.

:func:`auto_layers` picks the layers for ``teacher_layers: auto`` / ``student_layers: auto``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from kdcli.errors import InputError, ModelError
from kdcli.models.utils import first_tensor

# Modules whose output is a nonlinearity applied to the layer before: the natural end of a layer.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Softplus)
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (paths are its own)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def resolve_modules(model: nn.Module, paths: Sequence[str], where: str, role: str) -> dict[str, nn.Module]:
    """Map each dotted path to its module; an unknown path is an InputError naming the recipe
    field ``where`` (e.g. ``distill.losses[2].student_layers``) and the model's top-level modules."""
    model = unwrap(model)
    out = {}
    for p in paths:
        try:
            out[p] = model.get_submodule(p)
        except AttributeError:
            top = ", ".join(n for n, _ in model.named_children()) or "(none)"
            raise InputError(f"{where}: no module {p!r} in the {role}; top-level modules are: {top}") from None
    return out


class FeatureTaps:
    """Forward hooks that store the outputs of the modules at ``paths`` while the block is open.

    >>> with FeatureTaps(model, ["layer1", "layer3"]) as taps:
    ...     logits = model(x)
    >>> taps.features["layer3"].shape          # (N, C, H, W)

    A module called several times keeps its first output of the forward pass. When the model
    holds in-place modules (``ReLU(inplace=True)``), the stored output would be overwritten by the
    next layer, so outputs are cloned (autograd flows through the clone); a later in-place change
    that still slips through (a functional ``relu_``) is detected by the tensor's version counter.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], *, where: str = "layers", role: str = "model"):
        self.model = unwrap(model)
        self.paths = list(dict.fromkeys(paths))
        self.modules = resolve_modules(self.model, self.paths, where, role)
        self.clone = any(getattr(m, "inplace", False) is True for m in self.model.modules())
        self.features: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles: list = []

    def _hook(self, path: str):
        def hook(_module, _inputs, output):
            if path in self.features:
                return
            t = first_tensor(output)
            if t is None:
                raise ModelError(f"layer {path!r} returned {type(output).__name__}, not a tensor; tap another layer")
            if self.clone:
                t = t.clone()
            self.features[path] = t
            self._versions[path] = t._version

        return hook

    def __enter__(self) -> "FeatureTaps":
        self.features, self._versions = {}, {}
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def get(self, path: str) -> torch.Tensor:
        """The stored output of ``path``; a ModelError if the forward pass never reached it or
        modified it in place afterwards."""
        if path not in self.features:
            raise ModelError(f"layer {path!r} was not called in the forward pass; tap a layer the model uses")
        t = self.features[path]
        if t._version != self._versions[path]:
            raise ModelError(f"layer {path!r}: its output was modified in place later in the forward pass; "
                             "tap the following layer instead")
        return t

    def collect(self) -> dict[str, torch.Tensor]:
        """All tapped outputs, checked (see :meth:`get`)."""
        return {p: self.get(p) for p in self.paths}


@torch.no_grad()
def trace_modules(model: nn.Module, example: torch.Tensor):
    """One forward pass recording, per module path, the call order, the output and whether it has
    parameters. Runs in eval mode (BatchNorm statistics are not touched) and restores the mode."""
    model = unwrap(model)
    records: dict[str, dict] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(_m, _i, out, name=name):
            if name not in records:
                records[name] = {"order": len(records), "out": first_tensor(out)}

        handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        final = first_tensor(model(example))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return records, final


def auto_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The layers ``auto`` stands for: the output of each stage of the model.

    The rule, applied to the top-level children of ``model`` in call order:

    1. the head is dropped: a child whose output *is* the model's output (the classifier);
    2. when any child outputs a spatial map (N, C, H, W), the vector-valued ones are dropped
       (the flatten-and-Linear part of the head, e.g. cnn3's ``fc1``);
    3. children with parameters and submodules are the stages: two or more of them are the answer
       (resnet: ``layer1, layer2, layer3`` — the stem ``conv1``/``bn1`` is a single layer, not a
       stage; cnn3: ``conv1, conv2, conv3``);
    4. a single stage (e.g. mlp's or vgg's ``features``), or a wrapper whose only child is the whole
       model, is opened and the rule applied inside it;
    5. among plain layers, the activation modules (ReLU, GELU, ...) are the ends of layers; where
       the spatial size changes (pooling), only the last one before each change is kept (mlp:
       ``features.2, features.4``; vgg: the ReLU before each max pool). Models with functional
       activations fall back to their Conv/Linear layers.

    ``example`` is a small input batch on the model's device. Raises ModelError if nothing fits;
    name the layers in the recipe then.
    """
    records, final = trace_modules(model, example)
    found = pick_layers(model, records, final)
    if not found:
        raise ModelError("could not choose layers automatically for this model; "
                         "name them in the recipe (teacher_layers / student_layers: [module.path, ...])")
    return found


def pick_layers(model: nn.Module, records: dict, final) -> list[str]:
    """:func:`auto_layers` on a trace already taken by :func:`trace_modules` (may be empty)."""
    return _pick(unwrap(model), "", records, final)


def block_layers(model: nn.Module, records: dict, final) -> list[str]:
    """The layers ``auto-blocks`` stands for: each stage of :func:`pick_layers` opened into the
    blocks it calls (its children that run in the forward pass and output a tensor of the stage's
    rank, in call order): ``layer1.0 ... layer3.2`` of a CIFAR ResNet-20. A stage with no such
    children (a plain layer) stands for itself. Block outputs are where a student pruned inside
    its blocks keeps the teacher's width, so block-wise hints match like for like (Li et al. 2020,
    "Few Sample Knowledge Distillation", match a pruned student to its teacher block by block)."""
    out = []
    for stage in pick_layers(model, records, final):
        rank = records[stage]["out"].dim()
        mod = unwrap(model).get_submodule(stage)
        kids = [f"{stage}.{n}" for n, _ in mod.named_children()
                if f"{stage}.{n}" in records and records[f"{stage}.{n}"]["out"] is not None
                and records[f"{stage}.{n}"]["out"].dim() == rank]
        kids.sort(key=lambda p: records[p]["order"])
        out += kids or [stage]
    return out


def _pick(module: nn.Module, prefix: str, records: dict, final) -> list[str]:
    kids = [(prefix + n, m) for n, m in module.named_children() if prefix + n in records]
    kids.sort(key=lambda k: records[k[0]]["order"])
    if not kids:
        return []
    body = [k for k in kids if records[k[0]]["out"] is not final]
    if len(body) == len(kids) and final is not None:  # the output was reshaped after the head
        last = records[kids[-1][0]]["out"]
        if last is not None and last.shape == final.shape:
            body = kids[:-1]
    is_stage = lambda m: any(True for _ in m.children()) and any(True for _ in m.parameters())  # noqa: E731
    if not body:  # a wrapper: its only child computes the whole model
        return _pick(kids[0][1], kids[0][0] + ".", records, final) if is_stage(kids[0][1]) else []
    dims = lambda k: records[k[0]]["out"].dim() if records[k[0]]["out"] is not None else 0  # noqa: E731
    if any(dims(k) >= 3 for k in body):
        body = [k for k in body if dims(k) >= 3]
    stages = [k for k in body if is_stage(k[1])]
    if len(stages) >= 2:
        return [p for p, _ in stages]
    if len(stages) == 1:
        inner = _pick(stages[0][1], stages[0][0] + ".", records, final)
        return inner or [stages[0][0]]
    return _layer_ends(body, records)


def _layer_ends(leaves: list, records: dict) -> list[str]:
    picked = [k for k in leaves if isinstance(k[1], ACTIVATIONS)]
    if not picked:
        picked = [k for k in leaves if isinstance(k[1], WEIGHTED)]
    size = lambda k: tuple(records[k[0]]["out"].shape[2:])  # noqa: E731
    keep = [k for i, k in enumerate(picked)
            if i + 1 == len(picked) or not size(k) or size(picked[i + 1]) != size(k)]
    return [p for p, _ in keep]
