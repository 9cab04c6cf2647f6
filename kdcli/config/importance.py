"""The channel-importance criteria a recipe may name (``prune.importance``), and which of them
need data: the one list that the schema, the pruner, ``analyze`` and ``compress`` read.
Their computation is :mod:`kdcli.prune.importance`."""

from __future__ import annotations

from typing import Literal

# name -> needs batches of data (gradients or activations) to score channels
CRITERIA: dict[str, bool] = {
    "magnitude": False,     # group L2 norm of the weights (Li et al. 2017; Fang et al. 2023)
    "magnitude-l1": False,  # group L1 norm
    "taylor": True,         # first-order Taylor (Molchanov et al. 2019): gradients of the loss
    "activation": True,     # mean |activation| entering the consumers (cf. APoZ, Hu et al. 2016)
    "bn-scale": False,      # |γ| of BatchNorm (Liu et al. 2017, "Network Slimming")
}
NAMES: tuple[str, ...] = tuple(CRITERIA)
NEEDS_DATA: frozenset[str] = frozenset(k for k, v in CRITERIA.items() if v)
ImportanceName = Literal[NAMES]  # type: ignore[valid-type] - built from the table above
