"""CI gates: parsing without eval, metric values read from a hand-made typed report through the
gate table, failure lines."""

from __future__ import annotations

import math

import pytest

from kdcli.errors import EXIT_GATE, GateError, InputError
from kdcli.reports.gates import GATE_METRICS, METRICS, check_gates, enforce_gates, metric_value, parse_gate
from kdcli.reports.models import ExportReport


def _stats(ms):
    return {"median_ms": ms, "p90_ms": ms, "p99_ms": ms, "mean_ms": ms, "min_ms": ms, "throughput": 1.0, "runs": 9,
            "provider": "CPUExecutionProvider", "threads": 2}


def _model(name, size, macs, params):
    return {"name": name, "file": f"{name}.onnx", "size_bytes": size, "exporter": "torch.export", "opset": 18,
            "external_data": False, "export_notes": [], "params": params, "macs": macs,
            "verification": {"max_abs_diff": 0.0, "top1_agreement": 1.0, "top1_ties": 0, "samples": 8,
                             "inputs": "data", "atol": 1e-4}}


def _report(teacher=True) -> ExportReport:
    cpu = {"student": {"1": _stats(0.5), "64": _stats(4.0)}}
    if teacher:
        cpu["teacher"] = {"1": _stats(1.0), "64": _stats(10.0)}
    return ExportReport.model_validate({
        "schema": "kdcli/export-report", "version": 1, "created": "2026-01-01T00:00:00+00:00",
        "environment": {"kdcli": "0.1.0", "cpu_threads": 2},
        "student": _model("s", 250, 40, 30),
        "teacher": _model("t", 1000, 100, 120) if teacher else None,
        "ratios": {"size": 0.25, "macs": 0.4, "params": 0.25} if teacher else None,
        "accuracy": {"samples": 200, "student_onnx": 0.905, "student_pytorch": 0.905,
                     "teacher_onnx": 0.92 if teacher else None, "teacher_pytorch": 0.92 if teacher else None,
                     "drop_pt": 1.5 if teacher else None},
        "latency": {"batch_sizes": [1, 64], "time_budget_s": 1.0, "primary_provider": "CPUExecutionProvider",
                    # a CUDA table with other numbers: gates must read the primary (CPU) one
                    "onnxruntime": {"CUDAExecutionProvider": {"student": {"1": _stats(9.0), "64": _stats(9.0)},
                                                              "teacher": {"1": _stats(1.0), "64": _stats(1.0)}},
                                    "CPUExecutionProvider": cpu},
                    "pytorch": {}, "speedup": {}},
        "gates": {"expressions": [], "failures": []}, "notes": [],
    })


@pytest.mark.parametrize("expr,metric,op,value", [
    ("accuracy_drop > 0.5", "accuracy_drop", ">", 0.5),
    ("speedup<2", "speedup", "<", 2.0),
    ("  speedup@64 <= 1.5e0 ", "speedup@64", "<=", 1.5),
    ("latency_ms >= .25", "latency_ms", ">=", 0.25),
    ("student_accuracy != -3", "student_accuracy", "!=", -3.0),
    ("size_ratio == 1", "size_ratio", "==", 1.0),
])
def test_parse_gate(expr, metric, op, value):
    g = parse_gate(expr)
    assert (g.metric, g.op, g.value) == (metric, op, value)


@pytest.mark.parametrize("expr", [
    "speedup < 2 and 1",                  # trailing tokens
    "speedup < __import__('os')",         # never evaluated
    "speedup => 2", "speedup = 2", "speedup 2", "< 2", "speedup <", "",
    "speedup < 2%",
])
def test_malformed_gate_is_input_error_listing_metrics(expr):
    with pytest.raises(InputError) as info:
        parse_gate(expr)
    msg = str(info.value)
    assert repr(expr) in msg and "accuracy_drop" in msg and "latency_ms" in msg


@pytest.mark.parametrize("expr", ["accuracy_pct > 1", "size_ratio@64 > 1", "speedup@x < 2", "Speedup < 2"])
def test_unknown_metric_is_input_error(expr):
    with pytest.raises(InputError, match="metric|expected"):
        parse_gate(expr)


def test_unknown_metric_message_lists_every_known_name():
    with pytest.raises(InputError) as info:
        parse_gate("bogus > 1")
    assert str(info.value) == ("gate 'bogus > 1': unknown metric 'bogus'; metrics: accuracy_drop, speedup, "
                               "speedup@N, size_ratio, macs_ratio, params_ratio, student_accuracy, accuracy, "
                               "latency_ms, latency_ms@N")
    with pytest.raises(InputError, match="unknown metric 'bogus'; metrics: accuracy_drop"):
        metric_value(_report(), "bogus")


def test_gate_table_names_every_metric_and_each_resolves():
    assert list(METRICS) == ["accuracy_drop", "speedup", "speedup@N", "size_ratio", "macs_ratio", "params_ratio",
                             "student_accuracy", "accuracy", "latency_ms", "latency_ms@N"]
    assert set(GATE_METRICS) == {n for n in METRICS if "@" not in n}
    r = _report()
    for name in METRICS:
        metric = name.replace("@N", "@64")
        assert parse_gate(f"{metric} < 0").metric == metric
        assert math.isfinite(metric_value(r, metric)), name


def test_metric_values_from_report():
    r = _report()
    assert metric_value(r, "accuracy_drop") == pytest.approx(1.5)     # 100 * (0.92 - 0.905)
    assert metric_value(r, "student_accuracy") == pytest.approx(90.5)
    assert metric_value(r, "speedup") == pytest.approx(2.5)           # largest batch: 10 / 4
    assert metric_value(r, "speedup@1") == pytest.approx(2.0)         # 1 / 0.5
    assert metric_value(r, "size_ratio") == 0.25 and metric_value(r, "macs_ratio") == 0.4
    assert metric_value(r, "params_ratio") == 0.25
    assert metric_value(r, "latency_ms") == 0.5 == metric_value(r, "latency_ms@1")
    assert metric_value(r, "latency_ms@64") == 4.0
    assert metric_value(r, "accuracy") == metric_value(r, "student_accuracy")
    assert set(METRICS) >= {"accuracy_drop", "speedup", "size_ratio", "macs_ratio", "params_ratio",
                            "student_accuracy", "latency_ms"}


def test_check_gates_returns_failure_lines():
    r = _report()
    assert check_gates(r, ["speedup < 2", "accuracy_drop > 2", "latency_ms > 1"]) == []
    fails = check_gates(r, ["speedup < 3", "accuracy_drop > 0.5", "macs_ratio <= 0.4", "speedup@1 != 2"])
    assert fails == ["gate 'speedup < 3' failed: speedup = 2.5",
                     "gate 'accuracy_drop > 0.5' failed: accuracy_drop = 1.5",
                     "gate 'macs_ratio <= 0.4' failed: macs_ratio = 0.4"]
    assert check_gates(r, []) == [] and check_gates(r, None) == []


def test_all_expressions_are_parsed_before_any_is_evaluated():
    with pytest.raises(InputError, match="bogus"):
        check_gates(_report(teacher=False), ["speedup < 2", "bogus > 1"])


def test_gate_needing_missing_data_is_input_error():
    r = _report(teacher=False)
    # student-only metrics still work without a teacher
    assert check_gates(r, ["student_accuracy < 90", "latency_ms > 0.4"]) == [
        "gate 'latency_ms > 0.4' failed: latency_ms = 0.5"]
    with pytest.raises(InputError, match="teacher"):
        check_gates(r, ["speedup < 2"])
    with pytest.raises(InputError, match=r"batch size 32.*\[1, 64\]"):
        check_gates(_report(), ["speedup@32 < 2"])
    r.accuracy = None
    with pytest.raises(InputError, match="no accuracy"):
        check_gates(r, ["student_accuracy < 90"])


def test_nan_metric_fails_its_gate():
    r = _report()
    r.ratios.size = math.nan
    assert check_gates(r, ["size_ratio > 0.5"]) == ["gate 'size_ratio > 0.5' failed: size_ratio = nan"]


def test_enforce_gates_raises_gate_error_with_exit_code_3():
    with pytest.raises(GateError) as info:
        enforce_gates(_report(), ["speedup < 3", "latency_ms > 0.1"])
    assert info.value.exit_code == EXIT_GATE == 3
    assert str(info.value) == ("gate 'speedup < 3' failed: speedup = 2.5; "
                               "gate 'latency_ms > 0.1' failed: latency_ms = 0.5")
    enforce_gates(_report(), ["speedup < 2"])  # passing gates: no error
