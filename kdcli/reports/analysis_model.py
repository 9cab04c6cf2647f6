"""``analysis.json`` (what ``kdcli analyze --out`` writes) as a typed, versioned data model.

:func:`kdcli.analyze.analysis.analyze` assembles the result as a dict (the renderers of
:mod:`kdcli.reports.analysis` read it); :func:`kdcli.reports.analysis.write_outputs` validates it
through :class:`AnalysisReport` (:func:`check_analysis`) before writing, so a result of the wrong
shape fails there rather than in a reader. ``prune.ratios_from`` reads ``suggested_ratios.ratios``.

Versioning: the file starts with ``"$schema": "urn:kdcli:schema:analysis:1"`` (the ``$id`` of the
JSON Schema, :func:`kdcli.reports.models.report_json_schema` ``("analysis")``) and keeps
``schema_version`` 1. Every model forbids unknown keys and is strict, as the export report's.
Files written before ``$schema`` existed read as version 1. Data-driven sections are null without
data; per-layer, per-group and per-channel figures are maps keyed by module path or group name.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import ConfigDict, Field

from kdcli.config.importance import NAMES as CRITERIA
from kdcli.reports.base import JSON_SCHEMA_DIALECT, Strict, check_written, parse_as, read_json, schema_uri

SCHEMA_VERSION = 1
SCHEMA_URI = schema_uri("analysis", SCHEMA_VERSION)

# Per-channel figures of a group: the importance criteria, then the two measured at the consumer.
ChannelFigure = Literal[(*CRITERIA, "mean_activation", "apoz")]  # type: ignore[valid-type]
Phase = Literal["static", "importance", "activation", "scan", "clusters"]
PcaLevel = Literal["0.9", "0.95", "0.99"]  # kdcli.analyze.sensitivity.PCA_LEVELS as strings


class AnalysedModel(Strict):
    name: str
    input_shape: list[int] = Field(description="one sample's shape, without the batch dimension")
    num_classes: int
    macs: int = Field(description="per sample (torch-pruning's counter)")
    params: int
    pruned: bool = Field(description="whether the model carries a pruning history")


class EvalData(Strict):
    """The evaluation subset the data-driven figures were measured on."""

    description: str
    split: Literal["val", "test", "train"]
    samples: int
    which: Optional[str] = Field(None, description="the data that split is, in words (data.val / data.test)")
    normalization: Optional[str] = Field(None, description="the input normalisation and where it came from")
    test_accuracy: Optional[float] = Field(None, description=(
        "top-1 on the test part, when the figures were measured on validation data and a test part exists"))


class Settings(Strict):
    ratios: list[float] = Field(description="pruning ratios of the sensitivity scan")
    target_macs: float = Field(description="a fraction of the model's MACs (≤ 1) or a MACs count")
    eval_samples: int
    critical_fraction: float
    seed: int
    clusters: Optional[int] = Field(description="--clusters K, or null")


class Layer(Strict):
    """One leaf layer with MACs or parameters (``(other)``: MACs the per-layer rules do not cover)."""

    name: str = Field(description="module path")
    type: str
    output_shape: list[int] = Field(description="one sample's output shape; [] when never called")
    params: int
    macs: int
    macs_share: float = Field(description="of the model's MACs")
    params_share: float = Field(description="of the model's parameters")


class GroupLayers(Strict):
    """The module paths a prunable group touches."""

    out: list[str] = Field(description="conv/linear layers whose output channels shrink")
    in_: list[str] = Field(alias="in", title="in", description="layers whose input shrinks by one per channel")
    in_other: list[str] = Field(description="consumers fed a flattened map (many inputs per channel)")
    norm: list[str] = Field(description="other layers with parameters (BatchNorm, ...)")


class Group(Strict):
    """One prunable group."""

    name: str = Field(description="root module path")
    channels: int = Field(description="the group's units: channels, or heads where unit is head")
    unit: Literal["channel", "head"] = Field("channel", description=(
        "what the group prunes one at a time: channels, or whole attention heads (a qkv group)"))
    layers: GroupLayers
    importance: dict[ChannelFigure, list[float]] = Field(description=(
        "per criterion, each channel's score divided by the group's mean; mean_activation and apoz per "
        "channel at the consumer's input (with data)"))


class ActivationSensitivity(Strict):
    """One tapped layer: its features' gradient statistics and sensitivity."""

    shape: list[int]
    grad_std: list[float]
    grad_mean_abs: list[float]
    active_fraction: list[float]
    sensitivity: list[float] = Field(description="in [0, 1], per feature")
    critical: list[bool]
    critical_count: int


class Redundancy(Strict):
    """PCA of one tapped layer's activations."""

    features: int
    samples: int
    components: dict[PcaLevel, int] = Field(description="principal components needed for that share of the variance")
    cumulative: list[float] = Field(description="explained-variance curve")


class ScanPoint(Strict):
    ratio: float
    channels_removed: int
    accuracy: float
    macs: int


class PruningSensitivity(Strict):
    """Each group pruned alone at each ratio."""

    criterion: str = Field(description="the importance channels were removed by (lowest first)")
    baseline_accuracy: float
    samples: int
    seconds: float
    curves: dict[str, list[ScanPoint]] = Field(description="group → one point per ratio")


class SuggestedRatios(Strict):
    """Per-group ratios predicted to reach ``target_macs``; ``ratios`` seeds ``prune.ratios_from``."""

    target_macs: float
    ratios: dict[str, float] = Field(description="group → pruning ratio (groups left whole are absent)")
    predicted_macs: int
    predicted_macs_fraction: float
    predicted_accuracy: float
    reached: bool
    method: str


class Clusters(Strict):
    """The K confusable class subsets (Hinton et al. 2015, §5.3)."""

    subsets: list[list[int]]
    subset_names: list[list[str]]
    cluster_of_class: list[int]
    covariance: list[list[float]]
    class_names: list[str]
    cluster_on: Literal["correlation", "covariance"]
    correlation: list[list[float]]
    split: Literal["val", "test", "train"]
    samples: int


class AnalysisReport(Strict):
    """The analysis of a model (``analysis.json``)."""

    model_config = ConfigDict(title="kdcli analysis", json_schema_extra={
        "$id": SCHEMA_URI, "$schema": JSON_SCHEMA_DIALECT})
    uri: ClassVar[str] = SCHEMA_URI
    what: ClassVar[str] = "analysis report"
    version_key: ClassVar[str] = "schema_version"
    version_number: ClassVar[int] = SCHEMA_VERSION

    schema_uri: Literal[SCHEMA_URI] = Field(SCHEMA_URI, alias="$schema", title="$schema", description=(
        "the JSON Schema this file follows (absent from files written before it was added: version 1)"))
    schema_version: Literal[SCHEMA_VERSION]
    model: AnalysedModel
    data: Optional[EvalData] = Field(description="null: static figures only")
    settings: Settings
    layers: list[Layer]
    groups: list[Group]
    notes: list[str]
    activation_sensitivity: Optional[dict[str, ActivationSensitivity]] = Field(description="tapped layer → figures")
    redundancy: Optional[dict[str, Redundancy]] = Field(description="tapped layer → PCA")
    pruning_sensitivity: Optional[PruningSensitivity]
    suggested_ratios: Optional[SuggestedRatios]
    clusters: Optional[Clusters]
    timings: dict[Phase, float] = Field(description="seconds per phase")
    files: Optional[list[str]] = Field(None, description="the names written beside it (absent before writing)")

    def to_json(self) -> dict[str, Any]:
        """As written to ``analysis.json``: JSON-ready, ``$schema`` first, the fields it was given."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def check_analysis(result: dict) -> AnalysisReport:
    """The analysis result (the dict :func:`kdcli.analyze.analysis.analyze` returns) validated as
    it would be written; ReportShapeError naming the field otherwise (a bug in kdcli, not in the input)."""
    return check_written(AnalysisReport, result, "analysis.json")


def parse_analysis(obj: Any, source: str = "analysis") -> AnalysisReport:
    """Validate a decoded ``analysis.json``; InputError naming ``source`` and the field otherwise."""
    return parse_as(AnalysisReport, obj, source, AnalysisReport.what, SCHEMA_URI, "schema_version", SCHEMA_VERSION)


def load_analysis(path) -> AnalysisReport:
    """Read and validate ``analysis.json``; InputError (one line: the file, the field) otherwise."""
    return parse_analysis(read_json(path), str(path))


__all__ = ["AnalysisReport", "SCHEMA_URI", "SCHEMA_VERSION", "check_analysis", "load_analysis", "parse_analysis"]
