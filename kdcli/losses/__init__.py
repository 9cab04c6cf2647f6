"""Distillation loss terms, one module per family.

- :mod:`kdcli.losses.logits`: Hinton KD, decoupled KD, cross-entropy;
- :mod:`kdcli.losses.hints`: FitNets hints, activation boundaries (regressor / connector);
- :mod:`kdcli.losses.maps`: attention transfer, FSP flow matrices;
- :mod:`kdcli.losses.vid`: variational information distillation, all-to-all λ pairing;
- :mod:`kdcli.losses.spec`: the recipe models (``distill.losses``).

:func:`build_term` turns one recipe entry into a :class:`~kdcli.losses.base.Term` module.
"""

from __future__ import annotations

from kdcli.losses.base import Layers, Term
from kdcli.losses.hints import ABTerm, HintTerm
from kdcli.losses.logits import CETerm, DKDTerm, KDTerm
from kdcli.losses.maps import ATTerm, FSPTerm
from kdcli.losses.spec import FEATURE_KINDS
from kdcli.losses.vid import VIDTerm

LOGIT_TERMS = {"kd": KDTerm, "ce": CETerm, "dkd": DKDTerm}
FEATURE_TERMS = {"hint": HintTerm, "at": ATTerm, "fsp": FSPTerm, "ab": ABTerm, "vid": VIDTerm}


def build_term(spec, name: str, layers: Layers | None = None, granularity=None) -> Term:
    """The term module of one ``distill.losses`` entry. Feature kinds need ``layers`` (resolved
    paths and shapes); ``granularity`` is a :class:`kdcli.granularity.GranularityMap` or None."""
    if spec.kind in LOGIT_TERMS:
        return LOGIT_TERMS[spec.kind](spec, name)
    assert spec.kind in FEATURE_KINDS and layers is not None
    return FEATURE_TERMS[spec.kind](spec, name, layers, granularity)


__all__ = ["Layers", "Term", "build_term", "LOGIT_TERMS", "FEATURE_TERMS"]
