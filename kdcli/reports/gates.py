"""Quality gates for CI: ``fail_if`` expressions evaluated against an export report, and against a
baseline report of an earlier run.

Grammar (a regular expression, never ``eval``)::

    <metric> <op> <number>                               accuracy_drop > 0.5, speedup@64 < 2
    <metric> <op> baseline.<metric> [(+|-|*) <number>]   latency_ms@1 > baseline.latency_ms@1 * 1.05

with ``op`` one of ``< <= > >= == !=``. An expression describes the *failing* condition, so a
gate fails when the comparison is true. Metrics are read from the typed report
(:class:`kdcli.reports.models.ExportReport`) through one fixed table, :data:`GATE_METRICS`: a name,
what it measures, its unit and the function that reads it. ``baseline.<metric>`` reads the same
table from the baseline report (``kdcli export --baseline PATH/report.json``, e.g. the main
branch's CI artifact); both sides of a gate must have the same unit (no ``latency_ms`` against
``baseline.speedup``). A gate naming ``baseline.`` without a baseline is refused before any work.
A failed gate is a line in ``report.gates.failures``; the CLI exits 3
(:class:`kdcli.errors.GateError`) when there is one.

The noise rule. Two latency measurements taken in different runs (different CI machines, other
jobs on them) differ even for the same model, so a latency or speed-up gate against a baseline
would fail at random if it compared medians plainly. Two corrections, for gates on a latency
metric (``latency_ms``, ``speedup`` and their ``@N`` forms) whose right side is
``baseline.<latency metric>``:

1. The machine's drift. ``kdcli export`` times the teacher alongside the student (alternating, so
   that both see the same load). When both reports hold the same teacher (name, parameters, MACs)
   timed at the baseline metric's batch size, a ``latency_ms`` baseline is first rescaled by the
   teacher's drift ``T_now / T_base``: what the baseline student would measure on this run's
   machine. (A speed-up is teacher / student already.) Without a common teacher the absolute
   medians are compared.
2. The noise band. Each latency median carries a *spread*: half the interquartile range of its
   timed runs, ``s = (p75 − p25) / 2`` (the middle half of the runs lay within about
   ``median ± s``). A speed-up ``T / S`` carries the student's relative spread,
   ``(T / S) · s_S / S``, and a rescaled baseline ``b · T_now / T_base`` carries
   ``s_b · T_now / T_base``: the teacher is the machine's yardstick, timed alternating with the
   student, so its jitter is the same load the student's spread already counts (counted again
   as independent noise, it widened the band until 41 % of a 1.4× slower student's runs passed,
   see ``benchmarks/gate_noise.py``). ``baseline × n`` carries ``|n| · s``, ``baseline ± n`` ``s``.
   The gate fails only when its failing comparison holds by more than the *noise band*
   ``1.5 · √(s_now² + s_baseline²)`` (:data:`NOISE_K`): a difference inside the band is not
   distinguishable from noise, and the gate passes saying so. 1.5 is calibrated with
   ``benchmarks/gate_noise.py`` on a shared 2-core machine (0.15–0.3 ms models): taking each of
   the 11 runs of the same student in turn as the baseline of the other 10, two sessions of it
   passed 110 and 107 of the 110 comparisons of the same student and failed 85 % and 93 % of
   those of a 1.4× and a 2× slower one; 1.0 raised false failures to 7–10 %, 2.0 let 26–37 % of
   the slower ones through.

``==`` and ``!=`` compare plainly. A report written before the quartiles were recorded (no
``p25_ms`` / ``p75_ms``) has no spread: its gate compares plainly and says "no spread recorded".
Gates against a plain number, and non-latency metrics (accuracy is measured on fixed data,
without noise), always compare plainly.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from kdcli.errors import GateError, InputError
from kdcli.reports.models import ExportReport, load_report

OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
             "==": operator.eq, "!=": operator.ne}
ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul}
NOISE_K = 1.5  # the noise band is NOISE_K · √(s_now² + s_baseline²); calibrated by benchmarks/gate_noise.py
BASELINE_FLAG = "--baseline"


# ------------------------------------------------------------------------------ metric readers
# Each reader gets the report, the batch size of a ``name@N`` metric (None without one) and the
# prefix of its error messages (``gate '<expr>'``, naming the baseline when it reads that), and
# returns the measured value; a spread reader returns the value's spread, or None when the report
# holds none.

def _no_teacher(report: ExportReport, metric: str, where: str) -> None:
    if report.teacher is None:
        raise InputError(f"{where}: {metric} compares with the teacher, but this report has none")


def _accuracy(report: ExportReport, where: str):
    acc = report.accuracy
    if acc is None or acc.student_onnx is None:
        raise InputError(f"{where}: the report has no accuracy (export ran without evaluation data)")
    return acc


def _stats(report: ExportReport, model: str, bs: int, where: str):
    lat = report.latency
    stats = lat.table().get(model, {}).get(str(bs))
    if stats is None:
        raise InputError(f"{where}: no {model} latency at batch size {bs} in the report "
                         f"(measured batch sizes: {lat.measured_batch_sizes('student') or 'none'})")
    return stats


def _median(report: ExportReport, model: str, bs: int, where: str) -> float:
    return float(_stats(report, model, bs, where).median_ms)


def half_iqr(stats) -> Optional[float]:
    """The spread of one latency median: half the interquartile range of its timed runs; None
    for stats without quartiles (reports written before they were recorded)."""
    if stats is None or stats.p25_ms is None or stats.p75_ms is None:
        return None
    return max(0.0, float(stats.p75_ms) - float(stats.p25_ms)) / 2


def _half_iqr(report: ExportReport, model: str, bs: int, where: str) -> Optional[float]:
    return half_iqr(_stats(report, model, bs, where))


def teacher_drift(report: ExportReport, baseline: ExportReport, bs: int) -> Optional[tuple[float, float, float]]:
    """How much slower (> 1) or faster this run's machine was than the baseline's, read from the
    teacher both runs measured at batch size ``bs``: ``(T_now / T_base, T_base, T_now)``; None
    unless both reports hold the same teacher (name, parameters, MACs) timed at ``bs``."""
    t, bt = report.teacher, baseline.teacher
    if t is None or bt is None or (t.name, t.params, t.macs) != (bt.name, bt.params, bt.macs):
        return None
    now = report.latency.table().get("teacher", {}).get(str(bs))
    then = baseline.latency.table().get("teacher", {}).get(str(bs))
    if now is None or then is None or not (now.median_ms > 0 and then.median_ms > 0):
        return None
    return now.median_ms / then.median_ms, then.median_ms, now.median_ms


def _accuracy_drop(report: ExportReport, bs: Optional[int], where: str) -> float:
    acc = _accuracy(report, where)
    if acc.teacher_onnx is None:
        raise InputError(f"{where}: the report has no teacher accuracy")
    return 100.0 * (acc.teacher_onnx - acc.student_onnx)


def _student_accuracy(report: ExportReport, bs: Optional[int], where: str) -> float:
    return 100.0 * _accuracy(report, where).student_onnx


def _ratio(field: str) -> Callable[[ExportReport, Optional[int], str], float]:
    def read(report: ExportReport, bs: Optional[int], where: str) -> float:
        if report.ratios is None:
            raise InputError(f"{where}: the report has no student / teacher ratios")
        return float(getattr(report.ratios, field))
    return read


def _speedup_bs(report: ExportReport, bs: Optional[int], where: str) -> int:
    if bs is None:  # the largest batch size the student was measured at
        sizes = report.latency.measured_batch_sizes("student")
        if not sizes:
            raise InputError(f"{where}: the report holds no onnxruntime latency")
        bs = max(sizes)
    return bs


def _speedup(report: ExportReport, bs: Optional[int], where: str) -> float:
    bs = _speedup_bs(report, bs, where)
    return _median(report, "teacher", bs, where) / _median(report, "student", bs, where)


def speedup_spread(table, bs: int) -> Optional[float]:
    """The spread of teacher / student at ``bs`` in a latency table (``Latency.table()``): the
    student's relative spread, as the teacher, timed alternating with it, shares its load (module
    docstring); None without quartiles."""
    t, s = table.get("teacher", {}).get(str(bs)), table.get("student", {}).get(str(bs))
    ss = half_iqr(s)
    if t is None or ss is None or t.median_ms <= 0 or s.median_ms <= 0:
        return None
    return (t.median_ms / s.median_ms) * ss / s.median_ms


def _speedup_spread(report: ExportReport, bs: Optional[int], where: str) -> Optional[float]:
    bs = _speedup_bs(report, bs, where)
    for model in ("teacher", "student"):
        _median(report, model, bs, where)  # measured at bs, or an InputError naming the gate
    return speedup_spread(report.latency.table(), bs)


def _latency_ms(report: ExportReport, bs: Optional[int], where: str) -> float:
    return _median(report, "student", 1 if bs is None else bs, where)


def _latency_spread(report: ExportReport, bs: Optional[int], where: str) -> Optional[float]:
    return _half_iqr(report, "student", 1 if bs is None else bs, where)


@dataclass(frozen=True)
class GateMetric:
    """One entry of :data:`GATE_METRICS`."""

    name: str
    help: str
    read: Callable[[ExportReport, Optional[int], str], float]
    unit: str  # both sides of a baseline gate must have the same
    needs_teacher: bool = False
    at_batch_size: bool = False  # also ``name@N``
    spread: Optional[Callable[[ExportReport, Optional[int], str], Optional[float]]] = None  # a noisy (latency) metric
    absolute_latency: bool = False  # a student latency: rescaled by the teacher's drift against a baseline


# The fixed table of gate metrics: name → (what it measures, how it is read). Order is the order
# of the metric list in error messages and in METRICS.
GATE_METRICS: dict[str, GateMetric] = {m.name: m for m in [
    GateMetric("accuracy_drop", "teacher − student ONNX accuracy, in percentage points", _accuracy_drop, "pt",
               needs_teacher=True),
    GateMetric("speedup", "teacher / student median onnxruntime latency at the largest batch size", _speedup, "×",
               needs_teacher=True, at_batch_size=True, spread=_speedup_spread),
    GateMetric("size_ratio", "student / teacher ONNX file size", _ratio("size"), "ratio", needs_teacher=True),
    GateMetric("macs_ratio", "student / teacher MACs", _ratio("macs"), "ratio", needs_teacher=True),
    GateMetric("params_ratio", "student / teacher parameters", _ratio("params"), "ratio", needs_teacher=True),
    GateMetric("student_accuracy", "student ONNX accuracy, in percent", _student_accuracy, "%"),
    GateMetric("accuracy", "the same as student_accuracy: student ONNX accuracy, in percent", _student_accuracy, "%"),
    GateMetric("latency_ms", "student median onnxruntime latency at batch size 1, in ms", _latency_ms, "ms",
               at_batch_size=True, spread=_latency_spread, absolute_latency=True),
]}


def _metrics() -> dict[str, str]:
    out = {}
    for m in GATE_METRICS.values():
        out[m.name] = m.help
        if m.at_batch_size:
            out[f"{m.name}@N"] = f"the same at batch size N (e.g. {m.name}@1, {m.name}@64)"
    return out


METRICS: dict[str, str] = _metrics()  # every name a gate accepts (``speedup@N`` for the @ forms) → help

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_METRIC = r"[A-Za-z_]+(?:@\d+)?"
_GATE = re.compile(rf"^\s*(?P<metric>{_METRIC})\s*(?P<op><=|>=|==|!=|<|>)\s*"
                   rf"(?:(?P<value>{_NUMBER})|baseline\.(?P<base>{_METRIC})"
                   rf"(?:\s*(?P<arith>[-+*])\s*(?P<operand>{_NUMBER}))?)\s*$")


@dataclass(frozen=True)
class Gate:
    """One parsed gate: fails when ``metric op value`` holds; for a baseline gate ``value`` is None
    and the right side is ``baseline.<base> <arith> <operand>``."""

    expr: str
    metric: str
    op: str
    value: Optional[float]
    base: Optional[str] = None       # the baseline metric, for ``baseline.<base>``
    arith: Optional[str] = None      # + - * (None: the baseline value itself)
    operand: Optional[float] = None

    @property
    def uses_baseline(self) -> bool:
        return self.base is not None

    def rhs(self, baseline_value: float) -> float:
        """The right side from the baseline's value (``baseline.x * 1.05`` → 1.05 · x)."""
        return baseline_value if self.arith is None else ARITHMETIC[self.arith](baseline_value, self.operand)

    def rhs_spread(self, baseline_spread: float) -> float:
        """The spread of the right side: scaled by ``|n|`` for ``* n``, unchanged by ``± n``."""
        return baseline_spread * abs(self.operand) if self.arith == "*" else baseline_spread

    def fails(self, measured: float, threshold: Optional[float] = None, band: float = 0.0) -> bool:
        """True when the failing condition holds for ``measured`` against ``threshold`` (the
        gate's number by default), by more than ``band`` for ``< <= > >=``. NaN always fails: unmeasurable."""
        threshold = self.value if threshold is None else threshold
        if math.isnan(measured) or math.isnan(threshold):
            return True
        holds = OPERATORS[self.op](measured, threshold)
        if band > 0 and self.op not in ("==", "!="):
            return holds and abs(measured - threshold) > band
        return holds


@dataclass(frozen=True)
class GateResult:
    """The verdict on one gate: ``message`` is one line, for a passed gate too (JUnit, CI summaries)."""

    expr: str
    passed: bool
    message: str
    value: float
    threshold: float
    band: Optional[float] = None  # the noise band a baseline latency gate allowed for; None: plain comparison
    baseline: bool = False        # whether it compared with the baseline
    drift: Optional[float] = None  # the teacher's T_now / T_base the baseline latency was rescaled by


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
    """Parse ``"<metric> <op> <number>"`` or ``"<metric> <op> baseline.<metric> [+|-|* <number>]"``;
    raises InputError naming the expression and the metrics."""
    m = _GATE.match(str(expr))
    if not m:
        raise InputError(f"gate {expr!r}: expected '<metric> <op> <number>' or '<metric> <op> baseline.<metric> "
                         f"[+|-|* <number>]' with op one of {' '.join(OPERATORS)}; metrics: {_metric_list()}")
    metric, base = m.group("metric"), m.group("base")
    for name in (metric, base):
        if name is not None and _resolve(name) is None:
            raise InputError(f"gate {expr!r}: unknown metric {name!r}; metrics: {_metric_list()}")
    if base is not None:
        unit, base_unit = _resolve(metric)[0].unit, _resolve(base)[0].unit
        if unit != base_unit:
            raise InputError(f"gate {expr!r}: compares {metric} ({unit}) with baseline.{base} ({base_unit}); "
                             "both sides need the same unit")
        return Gate(str(expr).strip(), metric, m.group("op"), None, base, m.group("arith"),
                    None if m.group("operand") is None else float(m.group("operand")))
    return Gate(str(expr).strip(), metric, m.group("op"), float(m.group("value")))


def _baseline_where(expr: str, source: str) -> str:
    return f"gate {expr!r} (baseline {source})"


def parse_gates(exprs, baseline: ExportReport | None = None, baseline_source: str = "report") -> list[Gate]:
    """Parse every expression, before any work: a gate naming ``baseline.`` without ``baseline`` is
    an InputError naming the gate and ``--baseline``; with one, its right side must be readable
    from the baseline (``baseline_source`` names the file in messages)."""
    gates = [parse_gate(e) for e in (exprs or [])]
    for g in gates:
        if not g.uses_baseline:
            continue
        if baseline is None:
            raise InputError(f"gate {g.expr!r} compares with a baseline: give {BASELINE_FLAG} PATH/report.json "
                             "(the report.json of an earlier kdcli export)")
        metric_value(baseline, g.base, g.expr, where=_baseline_where(g.expr, baseline_source))
    return gates


def _read(report: ExportReport, metric: str, where: str) -> tuple[GateMetric, float, Optional[float]]:
    resolved = _resolve(metric)
    if resolved is None:
        raise InputError(f"{where}: unknown metric {metric!r}; metrics: {_metric_list()}")
    entry, bs = resolved
    if entry.needs_teacher:
        _no_teacher(report, metric, where)
    value = float(entry.read(report, bs, where))
    spread = entry.spread(report, bs, where) if entry.spread is not None else None
    return entry, value, spread


def metric_value(report: ExportReport, metric: str, expr: str = "", *, where: str = "") -> float:
    """The value of ``metric`` (a name in :data:`METRICS`, ``speedup@64`` for the @ forms) in ``report``."""
    return _read(report, metric, where or f"gate {(expr or metric)!r}")[1]


def metric_spread(report: ExportReport, metric: str) -> Optional[float]:
    """The spread of ``metric`` in ``report`` (see the module docstring); None for a metric without
    noise or a report without quartiles."""
    return _read(report, metric, f"gate {metric!r}")[2]


_SHOWN = {"+": "+", "-": "−", "*": "×"}  # arithmetic as messages write it


def _g(x: float) -> str:
    return f"{x:.4g}"


def evaluate_gate(report: ExportReport, gate: Gate, baseline: ExportReport | None = None,
                  baseline_source: str = "report") -> GateResult:
    """The verdict on one parsed gate (see the module docstring for the noise rule)."""
    entry, value, spread = _read(report, gate.metric, f"gate {gate.expr!r}")
    if not gate.uses_baseline:
        failed = gate.fails(value)
        return GateResult(gate.expr, not failed, f"gate {gate.expr!r} {'failed' if failed else 'passed'}: "
                          f"{gate.metric} = {_g(value)}", value, gate.value)
    if baseline is None:
        raise InputError(f"gate {gate.expr!r} compares with a baseline: give {BASELINE_FLAG} PATH/report.json "
                         "(the report.json of an earlier kdcli export)")
    base_entry, base_value, base_spread = _read(baseline, gate.base, _baseline_where(gate.expr, baseline_source))
    noisy = entry.spread is not None and base_entry.spread is not None and gate.op not in ("==", "!=")
    with_spread = noisy and spread is not None and base_spread is not None
    lhs = f"{gate.metric} = {_g(value)}" + (f" (spread ±{_g(spread)})" if with_spread else "")
    rhs = f"baseline {_g(base_value)}" + (f" (±{_g(base_spread)})" if with_spread else "")
    drift = None
    if entry.absolute_latency and base_entry.absolute_latency:  # the machines' speeds, told by the teacher
        drift = teacher_drift(report, baseline, _resolve(gate.base)[1] or 1)
    if drift is not None:
        factor, t_then, t_now = drift
        rescaled = base_value * factor
        if with_spread:
            base_spread *= factor
        base_value = rescaled
        rhs += f" × {factor:.3g} (the teacher's drift, {_g(t_then)} → {_g(t_now)} ms) = {_g(rescaled)}"
    threshold = gate.rhs(base_value)
    arith = "" if gate.arith is None else f" {_SHOWN[gate.arith]} {_g(gate.operand)}"
    rhs += f"{arith} = {_g(threshold)}" if arith else ""
    band = NOISE_K * math.hypot(spread, gate.rhs_spread(base_spread)) if with_spread else None
    failed = gate.fails(value, threshold, band or 0.0)
    text = f"gate {gate.expr!r} {'failed' if failed else 'passed'}: {lhs}, {rhs}"
    if band is not None:
        holds = not (math.isnan(value) or math.isnan(threshold)) and OPERATORS[gate.op](value, threshold)
        if failed:
            text += f"; beyond the noise band (±{_g(band)})"
        elif holds:
            text += f"; off by {_g(abs(value - threshold))}, within the noise band (±{_g(band)})"
        else:
            text += f" (noise band ±{_g(band)})"
    elif noisy:
        text += "; no spread recorded, plain comparison"
    return GateResult(gate.expr, not failed, text, value, threshold, band, baseline=True,
                      drift=None if drift is None else drift[0])


def evaluate_gates(report: ExportReport, exprs, baseline: ExportReport | None = None,
                   baseline_source: str = "report") -> list[GateResult]:
    """The verdict on each of ``exprs``, in order; all are parsed (and the baseline's sides read)
    before any is evaluated."""
    gates = parse_gates(exprs, baseline, baseline_source)
    return [evaluate_gate(report, g, baseline, baseline_source) for g in gates]


def check_gates(report: ExportReport, exprs, baseline: ExportReport | None = None,
                baseline_source: str = "report") -> list[str]:
    """Evaluate ``exprs`` against ``report`` (and ``baseline``); returns one line per failed gate
    (empty when all pass), e.g. ``gate 'speedup < 2' failed: speedup = 1.43``. All expressions are
    parsed before any is evaluated."""
    return [r.message for r in evaluate_gates(report, exprs, baseline, baseline_source) if not r.passed]


def enforce_gates(report: ExportReport, exprs, baseline: ExportReport | None = None) -> None:
    """Raise GateError (exit code 3) listing every failed gate, if any."""
    failures = check_gates(report, exprs, baseline)
    if failures:
        raise GateError("; ".join(failures))


def load_baseline(path: str | Path) -> ExportReport:
    """The baseline export report at ``path`` (``--baseline``); InputError in one line naming the
    flag and the file when it is missing or not a kdcli export report."""
    try:
        return load_report(path)
    except InputError as exc:
        raise InputError(f"{BASELINE_FLAG} {exc}") from None
