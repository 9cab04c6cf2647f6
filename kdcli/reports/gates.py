"""Quality gates for CI: ``fail_if`` expressions evaluated against an export report.

An expression is ``<metric> <op> <number>``, e.g. ``accuracy_drop > 0.5`` or ``speedup@64 < 2``;
it describes the *failing* condition, so a gate fails when the comparison is true. Parsed with a
regular expression, never ``eval``. Metrics are read from the typed report
(:class:`kdcli.reports.models.ExportReport`) through one fixed table, :data:`GATE_METRICS`: a
name, what it measures, and the function that reads it. A failed gate is a line in
``report.gates.failures``; the CLI exits 3 (:class:`kdcli.errors.GateError`) when there is one.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Callable, Optional

from kdcli.errors import GateError, InputError
from kdcli.reports.models import ExportReport

OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
             "==": operator.eq, "!=": operator.ne}


# ------------------------------------------------------------------------------ metric readers
# Each reader gets the report, the batch size of a ``name@N`` metric (None without one) and the
# expression (for error messages), and returns the measured value.

def _no_teacher(report: ExportReport, metric: str, expr: str) -> None:
    if report.teacher is None:
        raise InputError(f"gate {expr!r}: {metric} compares with the teacher, but this report has none")


def _accuracy(report: ExportReport, expr: str):
    acc = report.accuracy
    if acc is None or acc.student_onnx is None:
        raise InputError(f"gate {expr!r}: the report has no accuracy (export ran without evaluation data)")
    return acc


def _median(report: ExportReport, model: str, bs: int, expr: str) -> float:
    lat = report.latency
    value = lat.median_ms(model, bs)
    if value is None:
        raise InputError(f"gate {expr!r}: no {model} latency at batch size {bs} in the report "
                         f"(measured batch sizes: {lat.measured_batch_sizes('student') or 'none'})")
    return float(value)


def _accuracy_drop(report: ExportReport, bs: Optional[int], expr: str) -> float:
    acc = _accuracy(report, expr)
    if acc.teacher_onnx is None:
        raise InputError(f"gate {expr!r}: the report has no teacher accuracy")
    return 100.0 * (acc.teacher_onnx - acc.student_onnx)


def _student_accuracy(report: ExportReport, bs: Optional[int], expr: str) -> float:
    return 100.0 * _accuracy(report, expr).student_onnx


def _ratio(field: str) -> Callable[[ExportReport, Optional[int], str], float]:
    def read(report: ExportReport, bs: Optional[int], expr: str) -> float:
        if report.ratios is None:
            raise InputError(f"gate {expr!r}: the report has no student / teacher ratios")
        return float(getattr(report.ratios, field))
    return read


def _speedup(report: ExportReport, bs: Optional[int], expr: str) -> float:
    if bs is None:  # the largest batch size the student was measured at
        sizes = report.latency.measured_batch_sizes("student")
        if not sizes:
            raise InputError(f"gate {expr!r}: the report holds no onnxruntime latency")
        bs = max(sizes)
    return _median(report, "teacher", bs, expr) / _median(report, "student", bs, expr)


def _latency_ms(report: ExportReport, bs: Optional[int], expr: str) -> float:
    return _median(report, "student", 1, expr)


@dataclass(frozen=True)
class GateMetric:
    """One entry of :data:`GATE_METRICS`."""

    name: str
    help: str
    read: Callable[[ExportReport, Optional[int], str], float]
    needs_teacher: bool = False
    at_batch_size: bool = False  # also ``name@N``


# The fixed table of gate metrics: name → (what it measures, how it is read). Order is the order
# of the metric list in error messages and in METRICS.
GATE_METRICS: dict[str, GateMetric] = {m.name: m for m in [
    GateMetric("accuracy_drop", "teacher − student ONNX accuracy, in percentage points", _accuracy_drop,
               needs_teacher=True),
    GateMetric("speedup", "teacher / student median onnxruntime latency at the largest batch size", _speedup,
               needs_teacher=True, at_batch_size=True),
    GateMetric("size_ratio", "student / teacher ONNX file size", _ratio("size"), needs_teacher=True),
    GateMetric("macs_ratio", "student / teacher MACs", _ratio("macs"), needs_teacher=True),
    GateMetric("params_ratio", "student / teacher parameters", _ratio("params"), needs_teacher=True),
    GateMetric("student_accuracy", "student ONNX accuracy, in percent", _student_accuracy),
    GateMetric("latency_ms", "student median onnxruntime latency at batch size 1, in ms", _latency_ms),
]}


def _metrics() -> dict[str, str]:
    out = {}
    for m in GATE_METRICS.values():
        out[m.name] = m.help
        if m.at_batch_size:
            out[f"{m.name}@N"] = f"the same at batch size N (e.g. {m.name}@1, {m.name}@64)"
    return out


METRICS: dict[str, str] = _metrics()  # every name a gate accepts (``speedup@N`` for the @ forms) → help

_GATE = re.compile(r"^\s*(?P<metric>[A-Za-z_]+(?:@\d+)?)\s*(?P<op><=|>=|==|!=|<|>)\s*"
                   r"(?P<value>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    """One parsed gate: fails when ``metric op value`` holds."""

    expr: str
    metric: str
    op: str
    value: float

    def fails(self, measured: float) -> bool:
        """True when the failing condition holds for ``measured`` (NaN always fails: unmeasurable)."""
        if math.isnan(measured):
            return True
        return OPERATORS[self.op](measured, self.value)


def _metric_list() -> str:
    return ", ".join(METRICS)


def _resolve(metric: str) -> tuple[GateMetric, Optional[int]] | None:
    """The table entry and batch size of ``metric`` (``speedup@64`` → speedup, 64); None if unknown."""
    base, _, at = metric.partition("@")
    entry = GATE_METRICS.get(base)
    if entry is None or (at and not (entry.at_batch_size and at.isdigit())):
        return None
    return entry, (int(at) if at else None)


def parse_gate(expr: str) -> Gate:
    """Parse ``"<metric> <op> <number>"``; raises InputError naming the expression and the metrics."""
    m = _GATE.match(str(expr))
    if not m:
        raise InputError(f"gate {expr!r}: expected '<metric> <op> <number>' with op one of "
                         f"{' '.join(OPERATORS)}; metrics: {_metric_list()}")
    metric = m.group("metric")
    if _resolve(metric) is None:
        raise InputError(f"gate {expr!r}: unknown metric {metric!r}; metrics: {_metric_list()}")
    return Gate(str(expr).strip(), metric, m.group("op"), float(m.group("value")))


def metric_value(report: ExportReport, metric: str, expr: str = "") -> float:
    """The value of ``metric`` (a name in :data:`METRICS`, ``speedup@64`` for the @ forms) in ``report``."""
    expr = expr or metric
    resolved = _resolve(metric)
    if resolved is None:
        raise InputError(f"gate {expr!r}: unknown metric {metric!r}; metrics: {_metric_list()}")
    entry, bs = resolved
    if entry.needs_teacher:
        _no_teacher(report, metric, expr)
    return entry.read(report, bs, expr)


def check_gates(report: ExportReport, exprs) -> list[str]:
    """Evaluate ``exprs`` against ``report``; returns one line per failed gate (empty when all pass),
    e.g. ``gate 'speedup < 2' failed: speedup = 1.43``. All expressions are parsed before any is evaluated."""
    gates = [parse_gate(e) for e in (exprs or [])]
    failures = []
    for g in gates:
        value = metric_value(report, g.metric, g.expr)
        if g.fails(value):
            failures.append(f"gate {g.expr!r} failed: {g.metric} = {value:.4g}")
    return failures


def enforce_gates(report: ExportReport, exprs) -> None:
    """Raise GateError (exit code 3) listing every failed gate, if any."""
    failures = check_gates(report, exprs)
    if failures:
        raise GateError("; ".join(failures))
