"""The export report as a typed, versioned data model: what ``kdcli export`` writes to ``report.json``.

:class:`ExportReport` is the one definition: :func:`kdcli.export.onnx.export_report` builds it, the
renderers (:mod:`kdcli.reports.export`) and the CI gates (:mod:`kdcli.reports.gates`) read its
attributes, and its JSON Schema is ``ExportReport.model_json_schema()`` (:func:`report_json_schema`).
Every model forbids unknown keys and is strict (no ``"3"`` for 3, no 2.5 runs), so a report read
back with :func:`load_report` — e.g. a CI job reading another job's ``report.json`` — is either
what kdcli wrote or refused in one line naming the file and the field.

Versioning: ``report.json`` starts with ``"$schema": "urn:kdcli:schema:export-report:1"`` (also the
``$id`` of the JSON Schema); ``schema`` (``"kdcli/export-report"``) and ``version`` are kept as
before. The number changes only on an incompatible change, one a reader of the previous version
would refuse: a field added (unknown keys are refused), removed, renamed or retyped.

Conventions: accuracies are fractions in [0, 1]; ratios are student / teacher; speed-ups are
teacher / student median latency; latency tables are keyed provider → model → batch size (a
string: JSON object keys are strings) → stats. The fields with defaults are those version 1 has
always allowed to be absent (reports of earlier kdcli versions lack some); kdcli writes them all.
Torch-free: validating a report needs pydantic only.

The other reports have models of their own, read the same way: ``analysis.json``
(:class:`kdcli.reports.analysis_model.AnalysisReport`, ``urn:kdcli:schema:analysis:1``) and
``compress_report.json`` (:class:`kdcli.reports.compress_model.CompressReport`,
``urn:kdcli:schema:compress-report:1``). :data:`REPORT_KINDS` names all three;
:func:`report_json_schema` gives the JSON Schema of each, :func:`load_any` reads any of them, and
``python -m kdcli.reports.models FILE.json ...`` validates files of any kind (``--schema [NAME]``:
print a JSON Schema).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from kdcli.errors import InputError
from kdcli.reports.base import JSON_SCHEMA_DIALECT, error_line, parse_as, read_json, schema_uri
from kdcli.reports.base import Strict as _Strict

__all__ = ["ExportReport", "SCHEMA_URI", "REPORT_KINDS", "error_line", "load_any", "load_report", "parse_any",
           "parse_report", "report_json_schema", "report_model"]

REPORT_VERSION = 1
REPORT_NAME = "kdcli/export-report"
SCHEMA_URI = schema_uri("export-report", REPORT_VERSION)
PRIMARY_PROVIDER = "CPUExecutionProvider"


BatchSize = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*$")]  # "1", "64": a JSON object key


class _OnlyPatternKeys:
    """In the JSON Schema of a dict keyed by a pattern, refuse other keys as the model does (pydantic
    writes ``patternProperties`` alone, which lets any other key through)."""

    def __get_pydantic_json_schema__(self, core_schema, handler):
        schema = handler(core_schema)
        if "patternProperties" in schema:
            schema["additionalProperties"] = False
        return schema


class Verification(_Strict):
    """ONNX against PyTorch (:func:`kdcli.export.onnx.verify_onnx`)."""

    max_abs_diff: float = Field(description="largest absolute logit difference")
    top1_agreement: float = Field(description="fraction of samples with the same top-1 class")
    top1_ties: int = Field(0, description="disagreements where PyTorch's two leading logits are within 2·atol")
    samples: int
    inputs: Literal["data", "random"] = Field(description="evaluation data, or random inputs when there was none")
    atol: Optional[float] = Field(None, description="the largest absolute difference allowed")


class GraphStats(_Strict):
    """What :func:`kdcli.export.graph.simplify` did to the exported graph before it was saved."""

    nodes_before: int = Field(description="nodes as the exporter wrote them")
    nodes: int = Field(description="nodes in the saved file")
    batchnorm_folded: int = Field(description="BatchNormalization nodes folded into the Conv before them")
    identity_removed: int = Field(description="Identity nodes removed")
    gelu_reordered: int = Field(0, description=(
        "GELUs rewritten to the operand order onnxruntime fuses into one Gelu kernel (torch.export's "
        "order is not fused)"))
    initializers_removed: int = Field(0, description="initializers no longer used, dropped")


class ExportedModel(_Strict):
    """One exported model (``student.onnx`` or ``teacher.onnx``)."""

    name: str
    file: str = Field(description="file name of the .onnx, next to report.json")
    size_bytes: int = Field(description="bytes on disk, with the external .data file if any")
    exporter: Literal["torch.export", "torchscript"]
    opset: int
    external_data: bool = Field(False, description="weights in <file>.data (a model over 2 GB)")
    export_notes: list[str] = Field(default_factory=list)
    params: int
    macs: int
    verification: Verification
    graph: Optional[GraphStats] = Field(None, description="graph simplification (absent from earlier reports)")


class QuantizedModel(_Strict):
    """The student with int8 weights (``export.quantize: dynamic``): ``student.int8.onnx``, timed
    as ``student_int8`` in the onnxruntime latency table of the primary provider."""

    file: str = Field(description="file name of the .onnx, next to report.json")
    method: Literal["dynamic"] = Field(description="onnxruntime quantize_dynamic: int8 weights (QInt8)")
    size_bytes: int
    quantized_nodes: int = Field(description="operators stored with int8 weights (ConvInteger, MatMulInteger, ...)")
    preprocessed: bool = Field(description="whether onnxruntime's quant_pre_process ran first")
    accuracy: Optional[float] = Field(description="ONNX top-1 accuracy on the evaluation data; null without it")
    top1_agreement: float = Field(description="fraction of the verification inputs with the fp32 student's top-1 class")
    max_abs_diff: float = Field(description="largest absolute logit difference from the fp32 student")
    samples: int
    inputs: Literal["data", "random"]
    speedup: dict[str, Annotated[dict[BatchSize, float], _OnlyPatternKeys()]] = Field(
        description="provider → batch size → teacher / int8 median; empty without a teacher")
    speedup_vs_student: dict[str, Annotated[dict[BatchSize, float], _OnlyPatternKeys()]] = Field(
        description="provider → batch size → fp32 student / int8 median")


class Ratios(_Strict):
    """Student / teacher."""

    size: float = Field(description="ONNX file size")
    macs: float
    params: float


class Accuracy(_Strict):
    """Top-1 accuracy (fractions) on the evaluation data."""

    samples: int
    student_onnx: float
    teacher_onnx: Optional[float]
    student_pytorch: float
    teacher_pytorch: Optional[float] = None
    drop_pt: Optional[float] = Field(None, description="teacher − student ONNX accuracy, in percentage points")


class LatencyStats(_Strict):
    """Timings of one model at one batch size (:func:`kdcli.export.latency.measure_latency`)."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: Optional[float] = None
    min_ms: Optional[float] = None
    p25_ms: Optional[float] = Field(None, description=(
        "first quartile; with p75_ms the spread that baseline latency gates allow for (absent from earlier reports)"))
    p75_ms: Optional[float] = Field(None, description="third quartile (absent from earlier reports)")
    throughput: float = Field(description="samples per second at the median")
    runs: int
    provider: str = Field(description="the provider that ran it (pytorch-eager for PyTorch)")
    threads: int


ByModel = dict[str, Annotated[dict[BatchSize, LatencyStats], _OnlyPatternKeys()]]  # model ("teacher"/"student"/"student_int8") → batch size → stats


class ChannelBlock(_Strict):
    channels: int = Field(description="the block of channels onnxruntime's CPU convolutions work in on this host "
                                      "(its NCHWc layout: 16 with AVX-512, 8 with AVX2)")
    isa: str = Field(description="the instruction set that decides it (AVX-512, AVX2)")
    convolutions: int = Field(description="the student's convolutions")
    student_off: int = Field(description="student convolutions whose output channels are not a multiple of the block")
    teacher_off: Optional[int] = Field(description="the same count for the teacher; null without one")


class Latency(_Strict):
    batch_sizes: list[int]
    time_budget_s: float = Field(description="timing budget per batch size, shared by the models")
    primary_provider: str = Field(description="the onnxruntime provider gates compare on (CPU)")
    onnxruntime: dict[str, ByModel] = Field(description="provider → model → batch size → stats")
    pytorch: ByModel = Field(description="PyTorch eager, for reference")
    speedup: dict[str, Annotated[dict[BatchSize, float], _OnlyPatternKeys()]] = Field(description="provider → batch size → teacher / student median")
    channel_block: Optional[ChannelBlock] = Field(None, description=(
        "the host's onnxruntime channel block and the convolutions off it; null where the block is not "
        "known (not x86, neither AVX2 nor AVX-512; absent from earlier reports)"))

    def table(self, provider: str | None = None) -> ByModel:
        """The onnxruntime table of ``provider`` (default: the primary one); {} when not measured."""
        return self.onnxruntime.get(provider or self.primary_provider) or {}

    def median_ms(self, model: str, batch_size: int, provider: str | None = None) -> float | None:
        """Median onnxruntime latency of ``model`` at ``batch_size``, or None when not measured."""
        stats = self.table(provider).get(model, {}).get(str(batch_size))
        return None if stats is None else stats.median_ms

    def measured_batch_sizes(self, model: str = "student", provider: str | None = None) -> list[int]:
        return sorted(int(b) for b in self.table(provider).get(model, {}))


class Gates(_Strict):
    expressions: list[str] = Field(description="the --fail-if expressions, as given")
    failures: list[str] = Field(description="one line per failed gate; empty when all passed")


class ExportReport(_Strict):
    """The export report (``report.json``)."""

    model_config = ConfigDict(title="kdcli export report", json_schema_extra={
        "$id": SCHEMA_URI, "$schema": JSON_SCHEMA_DIALECT})
    # what readers check before validating (see kdcli.reports.base.parse_as)
    uri: ClassVar[str] = SCHEMA_URI
    what: ClassVar[str] = "export report"
    version_key: ClassVar[str] = "version"
    version_number: ClassVar[int] = REPORT_VERSION

    schema_uri: Literal[SCHEMA_URI] = Field(SCHEMA_URI, alias="$schema", title="$schema", description=(
        "the JSON Schema this report follows; changes only on incompatible changes (absent from reports "
        "written before it was added, which are read as version 1)"))
    schema_name: Literal[REPORT_NAME] = Field(alias="schema", title="schema")
    version: Literal[REPORT_VERSION]
    created: str = Field(description="ISO 8601, UTC")
    environment: dict[str, Union[str, int]] = Field(description="package versions and CPU threads")
    student: ExportedModel
    teacher: Optional[ExportedModel]
    student_int8: Optional[QuantizedModel] = Field(None, description=(
        "the int8 student (export.quantize: dynamic); null otherwise (absent from earlier reports)"))
    ratios: Optional[Ratios] = Field(description="student / teacher; null without a teacher")
    accuracy: Optional[Accuracy] = Field(description="null without evaluation data")
    latency: Latency
    gates: Gates
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        """The report as written to ``report.json``: a JSON-ready dict with ``$schema`` first."""
        return self.model_dump(mode="json", by_alias=True)




# ----------------------------------------------------------------------------- every report

# Report name (the <name> of its $schema URN) → (module, model). The other models import this
# module, so they are imported when asked for.
REPORT_KINDS: dict[str, tuple[str, str]] = {
    "export-report": ("kdcli.reports.models", "ExportReport"),          # export/report.json
    "analysis": ("kdcli.reports.analysis_model", "AnalysisReport"),      # analysis.json
    "compress-report": ("kdcli.reports.compress_model", "CompressReport"),  # compress_report.json
}


def report_model(name: str) -> type[BaseModel]:
    """The model of report ``name`` (a key of :data:`REPORT_KINDS`); InputError for another name."""
    import importlib

    if name not in REPORT_KINDS:
        raise InputError(f"unknown report {name!r}: expected one of {', '.join(REPORT_KINDS)}")
    module, cls = REPORT_KINDS[name]
    return getattr(importlib.import_module(module), cls)


def report_json_schema(name: str = "export-report") -> dict[str, Any]:
    """The JSON Schema of report ``name`` — ``export-report`` (``report.json``, the default),
    ``analysis`` (``analysis.json``) or ``compress-report`` (``compress_report.json``) — generated
    by pydantic from its model; its ``$id`` is the ``$schema`` the report files carry."""
    return report_model(name).model_json_schema(by_alias=True)


def _kind_of(obj: Any) -> str | None:
    """The report name of a decoded file: from its ``$schema``, else (files written before it) its shape."""
    if not isinstance(obj, dict):
        return None
    uri = obj.get("$schema")
    if isinstance(uri, str):
        return next((n for n in REPORT_KINDS if uri.startswith(f"urn:kdcli:schema:{n}:")), None)
    if obj.get("schema") == REPORT_NAME:
        return "export-report"
    if {"layers", "groups"} <= obj.keys():
        return "analysis"
    if {"steps", "run_dir"} <= obj.keys():
        return "compress-report"
    return None


def parse_any(obj: Any, source: str, name: str | None = None) -> BaseModel:
    """Validate a decoded report of kind ``name`` (found from the report itself when None)."""
    name = name or _kind_of(obj)
    if name is None:
        raise InputError(f"{source}: not a kdcli report (no $schema naming one of {', '.join(REPORT_KINDS)})")
    model = report_model(name)
    return parse_as(model, obj, source, model.what, model.uri, model.version_key, model.version_number)


def load_any(path: str | Path, name: str | None = None) -> BaseModel:
    """Read and validate the report file at ``path`` (any kind, or kind ``name``); InputError
    (one line: the file, the field) otherwise."""
    return parse_any(read_json(path), str(path), name)


def parse_report(obj: Any, source: str = "export report") -> ExportReport:
    """Validate a decoded export report (a dict); InputError naming ``source`` and the field otherwise."""
    return parse_any(obj, source, "export-report")


def load_report(path: str | Path) -> ExportReport:
    """Read and validate ``report.json`` at ``path``; InputError (one line: the file, the field) otherwise."""
    return load_any(path, "export-report")


_USAGE = ("usage: python -m kdcli.reports.models REPORT.json ...   validate report files (any kind)\n"
          f"       python -m kdcli.reports.models --schema [NAME]   print a JSON Schema; NAME: "
          f"{' | '.join(REPORT_KINDS)} (default export-report)")


def main(argv: list[str] | None = None) -> int:
    """``python -m kdcli.reports.models FILE.json ...``: validate report files of any kind (exit 0,
    or 2 with one ``error:`` line per bad file); ``--schema [NAME]`` prints a JSON Schema."""
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE)
        return 0 if args else 2
    if args[0] == "--schema":
        if len(args) > 2 or (len(args) == 2 and args[1] not in REPORT_KINDS):
            print(f"error: --schema takes one of {', '.join(REPORT_KINDS)}, got {' '.join(args[1:])!r}",
                  file=sys.stderr)
            return 2
        print(json.dumps(report_json_schema(*args[1:]), indent=2))
        return 0
    rc = 0
    for arg in args:
        try:
            report = load_any(arg)
            print(f"{arg}: ok ({report.uri})")
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            rc = 2  # kdcli.errors.EXIT_BAD_INPUT
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
