"""``compress_report.json`` (what ``kdcli compress`` writes into the run directory) as a typed,
versioned data model.

The report is :meth:`kdcli.dkdp.compress.CompressResult.to_json` with ``$schema`` and
``schema_version`` in front; :func:`kdcli.reports.compress.write_compress_report` validates it
through :class:`CompressReport` (:func:`check_compress_report`) before writing, so a result of
the wrong shape fails there rather than in a reader. ``export`` is the export report
(:class:`kdcli.reports.models.ExportReport`) when the run exported, else null.

Versioning: the file starts with ``"$schema": "urn:kdcli:schema:compress-report:1"`` (the ``$id``
of the JSON Schema, :func:`kdcli.reports.models.report_json_schema` ``("compress-report")``) and
keeps ``schema_version`` 1. Strict and closed as the other reports. Accuracies are fractions in
[0, 1]; ratios are student / teacher; a diverged step's accuracy is NaN.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import ConfigDict, Field

from kdcli.reports.base import JSON_SCHEMA_DIALECT, Strict, check_written, parse_as, read_json, schema_uri
from kdcli.reports.models import ExportReport

SCHEMA_VERSION = 1
SCHEMA_URI = schema_uri("compress-report", SCHEMA_VERSION)


class TeacherSummary(Strict):
    model: str = Field(description="model name (or the ensemble's label)")
    macs: int
    params: int
    val_accuracy: float
    test_accuracy: Optional[float] = Field(None, description="absent without a test split")


class StudentSummary(Strict):
    model: str
    file: str = Field(description="the student's file in the run directory")
    from_: Optional[str] = Field(alias="from", title="from", description=(
        "the step file it was chosen from; null when no step was kept"))
    macs: int
    params: int
    val_accuracy: float
    macs_ratio: float
    params_ratio: float
    test_accuracy: Optional[float] = Field(None, description="absent without a test split")


class Epoch(Strict):
    """One epoch of a step's distillation (:func:`kdcli.train.loop.fit`)."""

    epoch: int
    epochs: int
    train_loss: float
    train_accuracy: float
    lr: float
    epoch_seconds: float
    val_accuracy: Optional[float] = Field(None, description="absent without validation data")
    val_loss: Optional[float] = None
    loss_terms: Optional[dict[str, float]] = Field(
        None, description="each loss term's unweighted mean over the epoch's samples, by term name")


class Step(Strict):
    """One DKDP step attempt (:class:`kdcli.dkdp.run.StepRecord`)."""

    step: int
    attempt: int
    tau: Optional[float] = Field(description="the pruning threshold τ; null when the step did not prune")
    aggressiveness: float
    target_macs: Optional[float] = Field(description="the MACs the step aimed at")
    macs: int
    params: int
    macs_ratio: float
    params_ratio: float
    val_accuracy: float = Field(description="NaN when the distillation diverged")
    accuracy_drop: float
    accepted: bool
    reason: str = Field(description="why τ moved")
    seconds: float
    latency_ms: Optional[float] = None
    train_history: list[Epoch] = Field(default_factory=list)
    teacher_val_accuracy: Optional[float] = Field(None, description="the teaching teacher after distill.train_teacher")
    forced: Optional[str] = Field(None, description=(
        "why the target forced this step past the accuracy budget or the largest held cut; null otherwise"))
    latency_aim_ms: Optional[float] = Field(None, description=(
        "with a latency or speed-up target: the latency (ms at target.batch_size) this step aimed at; null when "
        "it served another target"))
    predicted_latency_ms: Optional[float] = Field(None, description=(
        "what the latency lookup table predicted for the step's plan (ms); null without an aim"))


class VidLambda(Strict):
    """λ of the VID term of the distillation that made the student (teacher × student layers)."""

    matrix: list[list[float]] = Field(description="rows: teacher layers; columns: student layers; columns sum to 1")
    teacher_layers: list[str]
    student_layers: list[str]
    learned: bool


class DataUsed(Strict):
    """Which data judged what (``data.val``/``data.test``) and the input normalisation."""

    splits: dict[str, str] = Field(description="split (train, val, test) -> which data it is, in words")
    normalization: str
    warnings: list[str] = Field(default_factory=list, description=(
        "about the choice of data: no held-out split, a validation split that looks memorised"))


class CompressReport(Strict):
    """The report of a ``kdcli compress`` run (``compress_report.json``)."""

    model_config = ConfigDict(title="kdcli compress report", json_schema_extra={
        "$id": SCHEMA_URI, "$schema": JSON_SCHEMA_DIALECT})
    uri: ClassVar[str] = SCHEMA_URI
    what: ClassVar[str] = "compress report"
    version_key: ClassVar[str] = "schema_version"
    version_number: ClassVar[int] = SCHEMA_VERSION

    schema_uri: Literal[SCHEMA_URI] = Field(SCHEMA_URI, alias="$schema", title="$schema", description=(
        "the JSON Schema this file follows (absent from files written before it was added: version 1)"))
    schema_version: Literal[SCHEMA_VERSION]
    run_dir: str
    teacher: TeacherSummary
    student: StudentSummary
    steps: list[Step]
    target_met: bool = Field(description="the resource target and accuracy budget (export gates are in gate_failures)")
    gate_failures: list[str]
    export: Optional[ExportReport] = Field(description="the export report (export/report.json); null without export")
    vid_lambda: Optional[VidLambda] = Field(description="null without a VID term")
    data: Optional[DataUsed] = Field(None, description="which data judged what (absent from earlier files)")

    def to_json(self) -> dict[str, Any]:
        """As written to ``compress_report.json``: JSON-ready, ``$schema`` first, the fields it was given."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def check_compress_report(obj: dict) -> CompressReport:
    """The report (``$schema``, ``schema_version`` and ``CompressResult.to_json()``) validated as
    it would be written; ReportShapeError naming the field otherwise (a bug in kdcli)."""
    return check_written(CompressReport, obj, "compress_report.json")


def parse_compress_report(obj: Any, source: str = "compress report") -> CompressReport:
    """Validate a decoded ``compress_report.json``; InputError naming ``source`` and the field otherwise."""
    return parse_as(CompressReport, obj, source, CompressReport.what, SCHEMA_URI, "schema_version", SCHEMA_VERSION)


def load_compress_report(path) -> CompressReport:
    """Read and validate ``compress_report.json``; InputError (one line: the file, the field) otherwise."""
    return parse_compress_report(read_json(path), str(path))


__all__ = ["CompressReport", "SCHEMA_URI", "SCHEMA_VERSION", "check_compress_report", "load_compress_report",
           "parse_compress_report"]
