"""Distillation loss terms, one module per family.

- :mod:`kdcli.distill.losses.logits`: Hinton KD, decoupled KD, cross-entropy;
- :mod:`kdcli.distill.losses.hints`: FitNets hints, activation boundaries (regressor / connector);
- :mod:`kdcli.distill.losses.maps`: attention transfer, FSP flow matrices;
- :mod:`kdcli.distill.losses.vid`: variational information distillation, all-to-all λ pairing;
- :mod:`kdcli.config.losses`: the recipe models (``distill.losses``).

:func:`build_term` turns one recipe entry into a :class:`~kdcli.distill.losses.base.Term` module.
"""

from __future__ import annotations

from kdcli.config.losses import FEATURE_KINDS
from kdcli.distill.losses import hints, logits, maps, vid  # noqa: F401 - importing them registers their terms
from kdcli.distill.losses.base import TERMS, Layers, Term


def build_term(spec, name: str, layers: Layers | None = None, granularity=None) -> Term:
    """The term module of one ``distill.losses`` entry. Feature kinds need ``layers`` (resolved
    paths and shapes); ``granularity`` is a :class:`kdcli.analyze.granularity.GranularityMap` or None."""
    cls = TERMS[spec.kind]
    if spec.kind not in FEATURE_KINDS:
        return cls(spec, name)
    assert layers is not None
    return cls(spec, name, layers, granularity)

__all__ = ["Layers", "Term", "TERMS", "build_term"]
