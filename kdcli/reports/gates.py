"""Quality gates for CI: ``fail_if`` expressions evaluated against an export report.

An expression is ``<metric> <op> <number>``, e.g. ``accuracy_drop > 0.5`` or ``speedup@64 < 2``;
it describes the *failing* condition, so a gate fails when the comparison is true. Parsed with a
regular expression, never ``eval``. The CLI maps a failed gate to :class:`kdcli.errors.GateError`
(exit code 3).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from kdcli.errors import GateError, InputError

OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
             "==": operator.eq, "!=": operator.ne}

METRICS = {
    "accuracy_drop": "teacher − student ONNX accuracy, in percentage points",
    "speedup": "teacher / student median onnxruntime latency at the largest batch size",
    "speedup@N": "the same at batch size N (e.g. speedup@1, speedup@64)",
    "size_ratio": "student / teacher ONNX file size",
    "macs_ratio": "student / teacher MACs",
    "params_ratio": "student / teacher parameters",
    "student_accuracy": "student ONNX accuracy, in percent",
    "latency_ms": "student median onnxruntime latency at batch size 1, in ms",
}

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


def parse_gate(expr: str) -> Gate:
    """Parse ``"<metric> <op> <number>"``; raises InputError naming the expression and the metrics."""
    m = _GATE.match(str(expr))
    if not m:
        raise InputError(f"gate {expr!r}: expected '<metric> <op> <number>' with op one of "
                         f"{' '.join(OPERATORS)}; metrics: {_metric_list()}")
    metric = m.group("metric")
    base = metric.split("@")[0]
    if ("@" in metric and base != "speedup") or (base not in METRICS and "@" not in metric):
        raise InputError(f"gate {expr!r}: unknown metric {metric!r}; metrics: {_metric_list()}")
    return Gate(str(expr).strip(), metric, m.group("op"), float(m.group("value")))


def _primary(report: dict) -> dict:
    """The onnxruntime latency table of the report's primary provider: {model: {bs: stats}}."""
    lat = report.get("latency") or {}
    provider = lat.get("primary_provider")
    return (lat.get("onnxruntime") or {}).get(provider) or {}


def _median(report: dict, model: str, bs: int, expr: str) -> float:
    table = _primary(report)
    try:
        return float(table[model][str(bs)]["median_ms"])
    except (KeyError, TypeError):
        measured = sorted(int(b) for b in (table.get("student") or {}))
        raise InputError(f"gate {expr!r}: no {model} latency at batch size {bs} in the report "
                         f"(measured batch sizes: {measured or 'none'})") from None


def metric_value(report: dict, metric: str, expr: str = "") -> float:
    """The value of ``metric`` (see ``METRICS``) in an export report (``kdcli.reports.export`` schema)."""
    expr = expr or metric
    teacher_needed = metric in ("accuracy_drop", "size_ratio", "macs_ratio", "params_ratio") or metric.startswith("speedup")
    if teacher_needed and not report.get("teacher"):
        raise InputError(f"gate {expr!r}: {metric} compares with the teacher, but this report has none")
    acc = report.get("accuracy") or {}
    if metric in ("accuracy_drop", "student_accuracy"):
        if acc.get("student_onnx") is None:
            raise InputError(f"gate {expr!r}: the report has no accuracy (export ran without evaluation data)")
        if metric == "student_accuracy":
            return 100.0 * acc["student_onnx"]
        return 100.0 * (acc["teacher_onnx"] - acc["student_onnx"])
    if metric in ("size_ratio", "macs_ratio", "params_ratio"):
        return float(report["ratios"][metric.removesuffix("_ratio")])
    if metric == "latency_ms":
        return _median(report, "student", 1, expr)
    if metric.startswith("speedup"):
        if "@" in metric:
            bs = int(metric.split("@")[1])
        else:
            sizes = [int(b) for b in (_primary(report).get("student") or {})]
            if not sizes:
                raise InputError(f"gate {expr!r}: the report holds no onnxruntime latency")
            bs = max(sizes)
        return _median(report, "teacher", bs, expr) / _median(report, "student", bs, expr)
    raise InputError(f"gate {expr!r}: unknown metric {metric!r}; metrics: {_metric_list()}")


def check_gates(report: dict, exprs) -> list[str]:
    """Evaluate ``exprs`` against ``report``; returns one line per failed gate (empty when all pass),
    e.g. ``gate 'speedup < 2' failed: speedup = 1.43``. All expressions are parsed before any is evaluated."""
    gates = [parse_gate(e) for e in (exprs or [])]
    failures = []
    for g in gates:
        value = metric_value(report, g.metric, g.expr)
        if g.fails(value):
            failures.append(f"gate {g.expr!r} failed: {g.metric} = {value:.4g}")
    return failures


def enforce_gates(report: dict, exprs) -> None:
    """Raise GateError (exit code 3) listing every failed gate, if any."""
    failures = check_gates(report, exprs)
    if failures:
        raise GateError("; ".join(failures))
