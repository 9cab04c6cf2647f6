"""Attention heads as pruning units.

A multi-head attention block whose queries, keys and values come from one ``qkv`` Linear
(outputs laid out ``[q | k | v]``, each ``[head 0 | head 1 | ...]``, as in timm and kdcli's zoo
ViT) can lose whole heads: the head's rows of q, k and v and its input columns of the output
projection. Torch-pruning's dependency graph already ties a ``qkv`` output row to the other two
rows of its position and to the projection's input column (through its unbind op); what it
cannot know is that the attention reshapes into heads of a fixed ``head_dim``, so a group of
single channels breaks the reshape. :class:`kdcli.prune.pruner.StructuredPruner` therefore
prunes such a group a head at a time: its units are heads, each the ``head_dim`` positions of
q, k and v it owns (Michel et al. 2019, "Are Sixteen Heads Really Better than One?", and
torch-pruning's ``num_heads`` option prune heads the same way).

Which modules are attention blocks: the model's own ``attention_heads()`` (``{qkv Linear:
number of heads}``, what kdcli's zoo ViT and torch-pruning's pruners take), else every module
with a ``qkv`` ``nn.Linear`` child and an integer ``num_heads`` dividing a third of its outputs
(timm's ``Attention``). A block that keeps its head count as a plain attribute (timm) has it
updated after pruning (:func:`sync_head_counts`); one that derives it from ``qkv`` (the zoo
ViT) needs nothing. A head group that still fails the pruner's probe is kept out as any other.
"""

from __future__ import annotations

from torch import nn


def _head_dim(qkv, n) -> int | None:
    """``qkv``'s head size for ``n`` heads, or None when they do not describe an attention block."""
    if isinstance(qkv, nn.Linear) and isinstance(n, int) and not isinstance(n, bool) and n > 0 \
            and qkv.out_features % (3 * n) == 0:
        return qkv.out_features // (3 * n)
    return None


def attention_heads(model: nn.Module) -> dict[nn.Linear, int]:
    """``{qkv Linear: head_dim}`` of every attention block of ``model`` (see the module doc)."""
    declared = getattr(model, "attention_heads", None)
    if callable(declared):
        try:
            pairs = list(dict(declared()).items())
        except Exception:  # noqa: BLE001 - a model's own method; without it, look for timm's layout
            pairs = []
        found = {qkv: hd for qkv, n in pairs if (hd := _head_dim(qkv, n))}
        if found:
            return found
    pairs = [(getattr(m, "qkv", None), getattr(m, "num_heads", None)) for m in model.modules()]
    return {qkv: hd for qkv, n in pairs if (hd := _head_dim(qkv, n))}


def head_units(chans: list[int], qkv: nn.Linear, head_dim: int) -> list[list[int]]:
    """The positions in ``chans`` (``qkv`` output rows) of each head still there, in head order:
    row ``r`` belongs to head ``(r mod width) // head_dim`` where ``width`` is a third of the rows."""
    width = qkv.out_features // 3
    units: dict[int, list[int]] = {}
    for pos, row in enumerate(chans):
        units.setdefault((int(row) % width) // head_dim, []).append(pos)
    return [units[h] for h in sorted(units)]


def sync_head_counts(model: nn.Module, heads: dict[nn.Linear, int]) -> None:
    """Set a plain ``num_heads`` attribute to what its ``qkv`` now holds (``out / (3 head_dim)``),
    for every attention block of ``heads`` (from :func:`attention_heads` before pruning)."""
    if not heads:  # called after every pruning, trials included: nothing to do for most models
        return
    for m in model.modules():
        qkv = getattr(m, "qkv", None)
        if qkv in heads and isinstance(m.__dict__.get("num_heads"), int):
            m.num_heads = qkv.out_features // (3 * heads[qkv])
