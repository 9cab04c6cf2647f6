"""The granularity map: which features of a layer are critical, and how each is matched.

Produced by activation-sensitivity analysis (:mod:`kdcli.analyze.analysis`), consumed by
granularity-weighted feature distillation (:mod:`kdcli.distill.losses`) and by diversified ensembles.

For each tapped layer (by module path) the map holds, per feature (channel or neuron):

- ``sensitivity``: activation-sensitivity score normalised to [0, 1];
- ``critical``: whether the feature was flagged critical;
- ``weight``: the weight of that feature's distillation loss term.

Critical features are matched at a coarse granularity (spatially pooled), the others precisely.
The JSON form (``granularity.json``) is versioned so that ``compress`` can read what ``analyze``
wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kdcli.errors import InputError
from kdcli.files import atomic_write_text

SCHEMA_VERSION = 1


@dataclass
class LayerGranularity:
    sensitivity: list[float]
    critical: list[bool]
    weight: list[float]

    def __post_init__(self) -> None:
        n = len(self.sensitivity)
        if len(self.critical) != n or len(self.weight) != n:
            raise InputError(
                f"granularity map: sensitivity, critical and weight must have the same length, "
                f"got {n}, {len(self.critical)}, {len(self.weight)}"
            )


@dataclass
class GranularityMap:
    layers: dict[str, LayerGranularity] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "layers": {
                name: {"sensitivity": g.sensitivity, "critical": g.critical, "weight": g.weight}
                for name, g in self.layers.items()
            },
        }

    @classmethod
    def from_json(cls, obj: dict, source: str = "granularity map") -> "GranularityMap":
        if not isinstance(obj, dict) or obj.get("schema_version") != SCHEMA_VERSION:
            raise InputError(f"{source}: expected a granularity map with schema_version {SCHEMA_VERSION}")
        try:
            layers = {
                name: LayerGranularity(
                    sensitivity=[float(v) for v in g["sensitivity"]],
                    critical=[bool(v) for v in g["critical"]],
                    weight=[float(v) for v in g["weight"]],
                )
                for name, g in obj["layers"].items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{source}: malformed layer entry ({exc})") from None
        return cls(layers)

    def save(self, path: Path) -> None:

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "GranularityMap":
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: granularity map not found") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return cls.from_json(obj, str(path))
