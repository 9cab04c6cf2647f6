"""The export report: run_export end to end on tiny models, the schema and its validator, the
Markdown / HTML / terminal renderings, and the shared SVG chart helpers."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from rich.console import Console

from kdcli.reports.charts import bar_chart, heatmap, histogram, html_page, html_table, line_chart
from kdcli.errors import GateError, InputError
from kdcli.export.onnx import run_export
from kdcli.models import build_model
from kdcli.reports.export import REPORT_SCHEMA, render_html, render_markdown, summary_table, validate, validate_report

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One run_export of a tiny teacher/student pair whose (always failing) gate raises GateError
    after the reports are written; yields (out_dir, report read back from report.json)."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    teacher = build_model("mlp", {"hidden": [64, 64]}, input_shape=SHAPE, num_classes=3).eval()
    student = build_model("mlp", {"hidden": [16]}, input_shape=SHAPE, num_classes=3).eval()
    info = {"name": "mlp", "input_shape": list(SHAPE), "num_classes": 3, "mean": [0.5], "std": [0.25],
            "class_names": ["cat", "dog", "<b>eel</b>"]}
    x = torch.randn(40, *SHAPE)
    # labels = the teacher's own predictions: teacher accuracy is exactly 100 %
    y = teacher(x).argmax(1)
    with pytest.raises(GateError, match=r"gate 'student_accuracy < 101' failed: student_accuracy = "):
        run_export(student, info, out, teacher=teacher, teacher_info=info, x_eval=x, y_eval=y,
                   batch_sizes=(1, 4), time_budget_s=0.05, gates=["student_accuracy < 101"])
    report = json.loads((out / "report.json").read_text())
    expected_student_acc = float((student(x).argmax(1) == y).float().mean())
    return out, report, expected_student_acc


def test_run_export_writes_models_and_reports(exported):
    out, report, s_acc = exported
    for name in ("student.onnx", "teacher.onnx", "report.json", "report.md", "report.html"):
        assert (out / name).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert report["version"] == 1 and report["schema"] == "kdcli/export-report"
    acc = report["accuracy"]
    assert acc["samples"] == 40 and acc["teacher_onnx"] == 1.0
    assert acc["student_onnx"] == pytest.approx(s_acc) and acc["student_pytorch"] == pytest.approx(s_acc)
    assert acc["drop_pt"] == pytest.approx(100 * (1 - s_acc))
    s, t = report["student"], report["teacher"]
    # torch-pruning counts a Linear as in*out + out (bias) and a ReLU as one op per element
    assert t["macs"] == (64 * 64 + 64 + 64) * 2 + 64 * 3 + 3 and s["macs"] == 64 * 16 + 16 + 16 + 16 * 3 + 3
    assert s["params"] == 64 * 16 + 16 + 16 * 3 + 3
    assert report["ratios"]["macs"] == pytest.approx(s["macs"] / t["macs"])
    assert report["ratios"]["size"] == pytest.approx(s["size_bytes"] / t["size_bytes"])
    assert s["verification"]["inputs"] == "data" and s["verification"]["max_abs_diff"] <= 1e-4
    lat = report["latency"]
    cpu = lat["onnxruntime"]["CPUExecutionProvider"]
    assert lat["batch_sizes"] == [1, 4] and set(cpu) == {"teacher", "student"} and set(cpu["student"]) == {"1", "4"}
    assert lat["speedup"]["CPUExecutionProvider"]["4"] == pytest.approx(
        cpu["teacher"]["4"]["median_ms"] / cpu["student"]["4"]["median_ms"])
    assert set(lat["pytorch"]["student"]) == {"1", "4"}
    assert report["gates"]["failures"][0].startswith("gate 'student_accuracy < 101' failed")


def test_report_validates_and_validator_catches_errors(exported):
    _, report, _ = exported
    assert validate(report, REPORT_SCHEMA) == []
    broken = copy.deepcopy(report)
    del broken["student"]["macs"]
    assert validate(broken, REPORT_SCHEMA) == ["$.student: missing required field 'macs'"]
    with pytest.raises(ValueError, match="missing required field 'macs'"):
        validate_report(broken)
    broken = copy.deepcopy(report)
    broken["latency"]["onnxruntime"]["CPUExecutionProvider"]["student"]["1"]["runs"] = 2.5
    assert validate(broken, REPORT_SCHEMA) == [
        "$.latency.onnxruntime.CPUExecutionProvider.student.1.runs: expected integer, got float"]
    broken = copy.deepcopy(report)
    broken["notes"] = ["ok", 3]
    assert validate(broken, REPORT_SCHEMA) == ["$.notes[1]: expected string, got int"]
    broken["teacher"] = None  # a report without a teacher is valid
    broken["notes"] = []
    assert validate(broken, REPORT_SCHEMA) == []


def test_validator_subset():
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": ["integer", "null"]},
                                                               "b": {"type": "array", "items": {"type": "number"}}}}
    assert validate({"a": None, "b": [1, 2.5]}, schema) == []
    assert validate({"a": True}, schema) == ["$.a: expected integer or null, got bool"]  # bool is not an int
    assert validate({"b": ["x"]}, schema) == ["$: missing required field 'a'", "$.b[0]: expected number, got str"]
    assert validate([], schema) == ["$: expected object, got list"]


def test_html_is_self_contained_with_svg_charts(exported):
    out, report, _ = exported
    page = (out / "report.html").read_text()
    assert page == render_html(report)
    assert page.count("<svg") == 2  # latency by batch size, accuracy against MACs
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script|<link|@import|url\(|\bsrc=|\bhref=", page, re.I)
    assert "Median latency by batch size" in page and "Accuracy against size" in page
    assert "teacher (CPU)" in page and "student (PyTorch)" in page


def test_markdown_and_terminal_table(exported):
    out, report, _ = exported
    md = (out / "report.md").read_text()
    assert md.startswith("# kdcli export report: mlp")
    assert f"| MACs | 8.64k | 1.11k | {report['ratios']['macs']:.3f}× |" in md
    assert "| 4 | " in md and "Accuracy on 40 evaluation samples." in md
    assert "❌ gate 'student_accuracy < 101' failed" in md
    table = summary_table(report)
    assert [c.header for c in table.columns] == ["", "teacher", "student", "ratio"]
    assert table.row_count == 5 + 2  # params, MACs, size, 2 accuracy rows; latency at batch 1 and 4
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(table)
    assert "latency @4 (ms, CPU)" in console.export_text()
    assert render_markdown(report) == md


def test_run_export_without_data_or_teacher_notes_random_verification(tmp_path):
    torch.manual_seed(1)
    student = build_model("lenet5", {}, input_shape=(1, 28, 28), num_classes=10).eval()
    info = {"name": "lenet5", "input_shape": [1, 28, 28], "num_classes": 10, "mean": None, "std": None,
            "class_names": None}
    report = run_export(student, info, tmp_path, batch_sizes=(1, 2), time_budget_s=0.02, gates=["latency_ms > 1e9"])
    assert report["gates"] == {"expressions": ["latency_ms > 1e9"], "failures": []}
    assert report["teacher"] is None and report["ratios"] is None and report["accuracy"] is None
    assert report["student"]["verification"]["inputs"] == "random"
    assert any("random inputs" in n for n in report["notes"])
    assert validate(report, REPORT_SCHEMA) == []
    assert "<svg" in (tmp_path / "report.html").read_text()
    with pytest.raises(InputError, match="gate 'speedup < 2'.*teacher"):
        from kdcli.reports.gates import check_gates

        check_gates(report, ["speedup < 2"])
    with pytest.raises(InputError, match="bogus"):  # a typo fails before any export
        run_export(student, info, tmp_path / "never", gates=["bogus < 1"])
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------ charts

def test_charts_escape_text_and_draw_every_point():
    svg = line_chart({"a<b": [(1, 2.0), (10, 4.0), (100, 3.0)], "c": [(1, 1.0)]}, title="t & <x>",
                     x_label="batch", y_label="ms", log_x=True)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "a&lt;b" in svg and "t &amp; &lt;x&gt;" in svg and "<x>" not in svg
    assert svg.count("<circle") == 4 and svg.count("<polyline") == 1  # one-point series: no line
    assert ">10<" in svg and ">100<" in svg  # log-axis ticks at powers of ten
    # every point lies inside the plot area (y axis from 34 to 272 px), and latency-like data gets no negative tick
    tall = line_chart({"t": [(1, 0.09), (64, 3.27)], "s": [(1, 0.03), (64, 0.3)]}, title="t", x_label="x",
                      y_label="ms", log_x=True)
    assert all(34 <= float(cy) <= 272 for cy in re.findall(r'cy="([\d.]+)"', tall))
    assert ">-1<" not in tall and ">0<" in tall and ">4<" in tall
    empty = line_chart({}, title="none", x_label="x", y_label="y")
    assert "no data" in empty


def test_line_chart_caps_a_percentage_axis_at_100():
    pts = {"acc": [(0.3, 62.0), (1.0, 99.6)]}
    ticks = lambda svg: [float(v) for v in re.findall(r'text-anchor="end" class="tk">([\d.]+)</text>', svg)]  # noqa: E731
    free = line_chart(pts, title="t", x_label="x", y_label="%")
    assert max(ticks(free)) == 110  # the padding above 99.6 % ends on a round tick past 100
    capped = line_chart(pts, title="t", x_label="x", y_label="%", y_max=100.0)
    assert max(ticks(capped)) == 100.0 and min(ticks(capped)) == 60.0
    assert all(34 <= float(cy) <= 272 for cy in re.findall(r'cy="([\d.]+)"', capped))


def test_bar_heatmap_histogram_and_table():
    bars = bar_chart(["l1", "l2", "l3"], {"s1": [1.0, -2.0, 3.0], "s2": [0.5, 0.5, float("nan")]},
                     title="b", y_label="v")
    assert bars.count("<rect") == 5 + 2  # finite bars + two legend swatches
    hm = heatmap([[0.0, 1.0], [0.5, 0.25]], ["r1", "r2"], ["c1", "c<2"], title="h")
    assert hm.count("<rect") == 4 and "c&lt;2" in hm and "rgb(255,255,255)" in hm and "rgb(0,114,178)" in hm
    # a fixed range: 0.476 against 0.524 is two mid-blues, not white against blue
    near = heatmap([[0.524], [0.476]], ["a", "b"], ["s"], title="λ", value_range=(0.0, 1.0))
    assert "rgb(255,255,255)" not in near and "rgb(0,114,178)" not in near and "scale: 0 (white) → 1 (blue)" in near
    width = int(re.search(r'<svg width="(\d+)"', near).group(1))
    assert width >= 120 + 6.5 * len("scale: 0 (white) → 1 (blue)")  # the scale line is not cut off
    hist = histogram([0, 0, 0, 1, 2, 3, 3, 4], 4, title="hist")
    counts = [int(m) for m in re.findall(r"\): (\d+)</title>", hist)]
    assert counts == [3, 1, 1, 3]  # [0,1) [1,2) [2,3) [3,4]: the maximum lands in the last bin
    table = html_table(["name", "value"], [["<i>", 1.23456], ["b", 7]])
    assert "&lt;i&gt;" in table and '<td class="n">1.23</td>' in table and '<td class="n">7</td>' in table
    page = html_page("T <1>", table)
    assert page.startswith("<!DOCTYPE html>") and "<title>T &lt;1&gt;</title>" in page and "<style>" in page
