"""Small torch helpers that every stage shares (model file, pruner, analysis, training), kept
here so that reading a model file needs neither the training loop nor the pruner's scoring."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (BatchNorm uses running statistics, no dropout); every module's own
    train/eval flag is put back afterwards, so a partly frozen model stays as it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def grads_enabled(model: nn.Module) -> Iterator[None]:
    """Autograd on for every parameter (tracing and Taylor scores need it); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def first_tensor(out) -> torch.Tensor | None:
    """A module's or model's output as one tensor: the tensor itself, or the first tensor found in a
    tuple, list or dict (an LSTM's ``(output, (h, c))``, a model returning ``{"logits": ...}``)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for o in values:
        t = first_tensor(o)
        if t is not None:
            return t
    return None


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): only this process writes files."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0
