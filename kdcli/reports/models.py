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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kdcli.errors import InputError

REPORT_VERSION = 1
REPORT_NAME = "kdcli/export-report"
SCHEMA_URI = f"urn:kdcli:schema:export-report:{REPORT_VERSION}"
PRIMARY_PROVIDER = "CPUExecutionProvider"


class _Strict(BaseModel):
    # strict: a report is data kdcli wrote, so nothing is coerced; inf/NaN (a throughput of a 0 ms
    # run, a NaN ratio) are written as JSON's Infinity/NaN, as json.dumps has always written them
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, ser_json_inf_nan="constants")


BatchSize = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]*$")]  # "1", "64": a JSON object key


class Verification(_Strict):
    """ONNX against PyTorch (:func:`kdcli.export.onnx.verify_onnx`)."""

    max_abs_diff: float = Field(description="largest absolute logit difference")
    top1_agreement: float = Field(description="fraction of samples with the same top-1 class")
    top1_ties: int = Field(0, description="disagreements where PyTorch's two leading logits are within 2·atol")
    samples: int
    inputs: Literal["data", "random"] = Field(description="evaluation data, or random inputs when there was none")
    atol: Optional[float] = Field(None, description="the largest absolute difference allowed")


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
    throughput: float = Field(description="samples per second at the median")
    runs: int
    provider: str = Field(description="the provider that ran it (pytorch-eager for PyTorch)")
    threads: int


ByModel = dict[str, dict[BatchSize, LatencyStats]]  # model ("teacher"/"student") → batch size → stats


class Latency(_Strict):
    batch_sizes: list[int]
    time_budget_s: float = Field(description="timing budget per batch size, shared by the models")
    primary_provider: str = Field(description="the onnxruntime provider gates compare on (CPU)")
    onnxruntime: dict[str, ByModel] = Field(description="provider → model → batch size → stats")
    pytorch: ByModel = Field(description="PyTorch eager, for reference")
    speedup: dict[str, dict[BatchSize, float]] = Field(description="provider → batch size → teacher / student median")

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
        "$id": SCHEMA_URI, "$schema": "https://json-schema.org/draft/2020-12/schema"})

    schema_uri: Literal[SCHEMA_URI] = Field(SCHEMA_URI, alias="$schema", title="$schema", description=(
        "the JSON Schema this report follows; changes only on incompatible changes (absent from reports "
        "written before it was added, which are read as version 1)"))
    schema_name: Literal[REPORT_NAME] = Field(alias="schema", title="schema")
    version: Literal[REPORT_VERSION]
    created: str = Field(description="ISO 8601, UTC")
    environment: dict[str, Union[str, int]] = Field(description="package versions and CPU threads")
    student: ExportedModel
    teacher: Optional[ExportedModel]
    ratios: Optional[Ratios] = Field(description="student / teacher; null without a teacher")
    accuracy: Optional[Accuracy] = Field(description="null without evaluation data")
    latency: Latency
    gates: Gates
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        """The report as written to ``report.json``: a JSON-ready dict with ``$schema`` first."""
        return self.model_dump(mode="json", by_alias=True)


def report_json_schema() -> dict[str, Any]:
    """The JSON Schema of ``report.json`` (generated by pydantic from :class:`ExportReport`)."""
    return ExportReport.model_json_schema(by_alias=True)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # the key itself is wrong (e.g. a batch size that is not a number)
            out += " (key)"
        else:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def error_line(exc: ValidationError) -> str:
    """The first error of ``exc`` as ``<field path>: <what was wrong>`` (+ how many more)."""
    errs = exc.errors(include_url=False)
    first = errs[0]
    line = f"{_loc(first['loc'])}: {first['msg']}"
    value = first.get("input")
    if first["type"] != "missing" and isinstance(value, (str, int, float, bool, type(None))):
        line += f" (got {value!r})" if len(repr(value)) <= 60 else ""
    if len(errs) > 1:
        line += f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})"
    return line


def parse_report(obj: Any, source: str = "export report") -> ExportReport:
    """Validate a decoded report (a dict); InputError naming ``source`` and the field otherwise."""
    if not isinstance(obj, dict):
        raise InputError(f"{source}: expected a JSON object (a kdcli export report), got {type(obj).__name__}")
    uri, version = obj.get("$schema"), obj.get("version")
    if (uri is not None and uri != SCHEMA_URI) or (version is not None and version != REPORT_VERSION):
        raise InputError(f"{source}: an export report of another version ($schema {uri!r}, version {version!r}); "
                         f"this kdcli reads {SCHEMA_URI} (version {REPORT_VERSION})")
    try:
        return ExportReport.model_validate(obj)
    except ValidationError as exc:
        raise InputError(f"{source}: not a valid export report: {error_line(exc)}") from None


def load_report(path: str | Path) -> ExportReport:
    """Read and validate ``report.json`` at ``path``; InputError (one line: the file, the field) otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    try:
        obj = json.loads(text)  # json, not pydantic's parser: NaN / Infinity as json.dumps writes them
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    return parse_report(obj, str(path))


def main(argv: list[str] | None = None) -> int:
    """``python -m kdcli.reports.models report.json ...``: validate reports (exit 0, or 2 with one
    ``error:`` line per bad file); ``--schema`` prints the JSON Schema."""
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m kdcli.reports.models REPORT.json ...   (or --schema: print the JSON Schema)")
        return 0 if args else 2
    if args == ["--schema"]:
        print(json.dumps(report_json_schema(), indent=2))
        return 0
    rc = 0
    for arg in args:
        try:
            load_report(arg)
            print(f"{arg}: ok ({SCHEMA_URI})")
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            rc = 2  # kdcli.errors.EXIT_BAD_INPUT
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
