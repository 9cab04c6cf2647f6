"""The export report: export_report end to end on tiny models, the typed model (ExportReport), its
JSON Schema and the refusal of a malformed report.json, the Markdown / HTML /
terminal renderings, and the shared SVG chart helpers."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from rich.console import Console

from kdcli.reports.charts import bar_chart, heatmap, histogram, html_page, html_table, line_chart
from kdcli.errors import InputError
from kdcli.export.onnx import export_report
from kdcli.models import build_model
from kdcli.reports.export import summary_table
from kdcli.reports.gates import METRICS, check_gates, metric_value
from kdcli.reports.models import SCHEMA_URI, ExportReport, load_report, parse_report, report_json_schema

SHAPE = (1, 8, 8)
TOP_LEVEL = ["$schema", "schema", "version", "created", "environment", "student", "teacher", "student_int8", "ratios",
             "accuracy", "latency", "gates", "notes"]
ADDED = {"$schema", "student_int8"}  # added to version 1 later: optional, reports written before lack them


def _mlp(hidden, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return build_model("mlp", {"hidden": hidden}, input_shape=SHAPE, num_classes=3).eval()


INFO = {"name": "mlp", "input_shape": list(SHAPE), "num_classes": 3, "mean": [0.5], "std": [0.25],
        "class_names": ["cat", "dog", "<b>eel</b>"]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export_report of a tiny teacher/student pair with an (always failing) gate: the failure is
    in the returned report, not raised; yields (out_dir, report read back from report.json, the
    student's expected accuracy, report.json as plain JSON)."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    teacher, student = _mlp([64, 64]), _mlp([16])
    x = torch.randn(40, *SHAPE)
    # labels = the teacher's own predictions: teacher accuracy is exactly 100 %
    y = teacher(x).argmax(1)
    returned = export_report(student, INFO, out, teacher=teacher, teacher_info=INFO, x_eval=x, y_eval=y,
                             batch_sizes=(1, 4), time_budget_s=0.05, gates=["student_accuracy < 101"])
    assert isinstance(returned, ExportReport)
    assert re.match(r"gate 'student_accuracy < 101' failed: student_accuracy = ", returned.gates.failures[0])
    raw = json.loads((out / "report.json").read_text())
    report = load_report(out / "report.json")
    assert report == returned
    expected_student_acc = float((student(x).argmax(1) == y).float().mean())
    return out, report, expected_student_acc, raw


def test_export_report_writes_models_and_reports(exported):
    out, report, s_acc, _ = exported
    for name in ("student.onnx", "teacher.onnx", "report.json", "report.md", "report.html"):
        assert (out / name).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert report.version == 1 and report.schema_name == "kdcli/export-report" and report.schema_uri == SCHEMA_URI
    acc = report.accuracy
    assert acc.samples == 40 and acc.teacher_onnx == 1.0
    assert acc.student_onnx == pytest.approx(s_acc) and acc.student_pytorch == pytest.approx(s_acc)
    assert acc.drop_pt == pytest.approx(100 * (1 - s_acc))
    s, t = report.student, report.teacher
    # torch-pruning counts a Linear as in*out + out (bias) and a ReLU as one op per element
    assert t.macs == (64 * 64 + 64 + 64) * 2 + 64 * 3 + 3 and s.macs == 64 * 16 + 16 + 16 + 16 * 3 + 3
    assert s.params == 64 * 16 + 16 + 16 * 3 + 3
    assert report.ratios.macs == pytest.approx(s.macs / t.macs)
    assert report.ratios.size == pytest.approx(s.size_bytes / t.size_bytes)
    assert s.verification.inputs == "data" and s.verification.max_abs_diff <= 1e-4
    lat = report.latency
    cpu = lat.onnxruntime["CPUExecutionProvider"]
    assert lat.batch_sizes == [1, 4] and set(cpu) == {"teacher", "student"} and set(cpu["student"]) == {"1", "4"}
    assert lat.speedup["CPUExecutionProvider"]["4"] == pytest.approx(
        cpu["teacher"]["4"].median_ms / cpu["student"]["4"].median_ms)
    assert set(lat.pytorch["student"]) == {"1", "4"}
    assert report.gates.expressions == ["student_accuracy < 101"]
    assert report.gates.failures[0].startswith("gate 'student_accuracy < 101' failed")


def test_report_json_has_schema_uri_and_the_same_fields_as_before(exported):
    out, report, _, raw = exported
    assert list(raw) == TOP_LEVEL  # $schema first, then the fields report.json always had (and student_int8), in order
    assert raw["student_int8"] is None  # written as null without export.quantize
    assert raw["$schema"] == SCHEMA_URI == "urn:kdcli:schema:export-report:1"
    assert raw["schema"] == "kdcli/export-report" and raw["version"] == 1
    assert set(raw["student"]) == {"name", "file", "size_bytes", "exporter", "opset", "external_data",
                                   "export_notes", "params", "macs", "verification", "graph"}
    assert set(raw["student"]["graph"]) == {"nodes_before", "nodes", "batchnorm_folded", "identity_removed",
                                            "gelu_reordered", "initializers_removed"}
    assert set(raw["student"]["verification"]) == {"max_abs_diff", "top1_agreement", "top1_ties", "samples",
                                                   "inputs", "atol"}
    assert set(raw["latency"]["onnxruntime"]["CPUExecutionProvider"]["student"]["1"]) == {
        "median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "p25_ms", "p75_ms", "throughput", "runs", "provider",
        "threads"}  # p25/p75 (optional): the spread of baseline latency gates
    assert report.to_json() == raw  # written and read back: the same JSON
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report.to_json()))


def test_json_schema_comes_from_the_model():
    schema = report_json_schema()
    assert schema == ExportReport.model_json_schema(by_alias=True)
    assert schema["$id"] == SCHEMA_URI and schema["additionalProperties"] is False
    assert list(schema["properties"]) == TOP_LEVEL
    assert schema["properties"]["$schema"]["const"] == SCHEMA_URI
    assert set(schema["required"]) == set(TOP_LEVEL) - ADDED  # reports written before $schema still read
    for name, sub in schema["$defs"].items():
        assert sub.get("additionalProperties") is False, name  # no unknown keys anywhere
    # batch-size maps: only "1", "64", ... keys, as the model (pydantic writes patternProperties alone)
    latency = schema["$defs"]["Latency"]["properties"]
    for by_batch in (latency["pytorch"]["additionalProperties"], latency["speedup"]["additionalProperties"]):
        assert list(by_batch["patternProperties"]) == ["^[1-9][0-9]*$"] and by_batch["additionalProperties"] is False


def _write(tmp_path, obj, name="report.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


@pytest.mark.parametrize("edit,field,why", [
    (lambda r: r["student"].pop("macs"), "student.macs", "Field required"),
    (lambda r: r["latency"]["onnxruntime"]["CPUExecutionProvider"]["student"]["1"].update(runs=2.5),
     "latency.onnxruntime.CPUExecutionProvider.student.1.runs", "valid integer"),
    (lambda r: r["student"].update(params="1234"), "student.params", "valid integer"),  # strict: no coercion
    (lambda r: r.update(notes=["ok", 3]), r"notes\[1\]", "valid string"),
    (lambda r: r["accuracy"].update(extra=1), "accuracy.extra", "Extra inputs are not permitted"),
    (lambda r: r.update(schema="other"), "schema", "Input should be 'kdcli/export-report'"),
    (lambda r: r["latency"]["speedup"]["CPUExecutionProvider"].update(x=1.0),
     r"latency.speedup.CPUExecutionProvider.x \(key\)", "pattern"),
])
def test_malformed_report_json_is_refused_naming_file_and_field(exported, tmp_path, edit, field, why):
    broken = copy.deepcopy(exported[3])
    edit(broken)
    path = _write(tmp_path, broken)
    with pytest.raises(InputError) as info:
        load_report(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a valid export report: ")
    assert re.search(field + ": .*" + why, msg), msg


def test_report_json_refusals_name_the_file(exported, tmp_path):
    raw = exported[3]
    with pytest.raises(InputError, match="another version.*reads urn:kdcli:schema:export-report:1"):
        load_report(_write(tmp_path, {**raw, "version": 2}))
    with pytest.raises(InputError, match="another version"):
        load_report(_write(tmp_path, {**raw, "$schema": "urn:kdcli:schema:export-report:2"}))
    with pytest.raises(InputError, match=r"report.json: not valid JSON \(line 1"):
        load_report(_write(tmp_path, "{not json"))
    with pytest.raises(InputError, match="report.json: expected a JSON object"):
        load_report(_write(tmp_path, "[]"))
    with pytest.raises(InputError, match="missing.json: file not found"):
        load_report(tmp_path / "missing.json")
    broken = copy.deepcopy(raw)
    del broken["student"]["macs"], broken["teacher"]["macs"]
    with pytest.raises(InputError, match=r"student.macs: Field required \(and 1 more error\)"):
        parse_report(broken, "job 12 artifact")


def test_command_line_validator(exported, tmp_path, capsys):
    """``python -m kdcli.reports.models FILE ...``, what a CI job runs on a report from another job."""
    from kdcli.reports.models import main

    good, bad = exported[0] / "report.json", _write(tmp_path, {**exported[3], "notes": [1]})
    assert main([str(good)]) == 0 and capsys.readouterr().out == f"{good}: ok ({SCHEMA_URI})\n"
    assert main([str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}: not a valid export report: notes[0]: Input should be a valid string (got 1)\n"
    assert main(["--schema"]) == 0 and json.loads(capsys.readouterr().out)["$id"] == SCHEMA_URI
    assert main(["--schema", "export-report"]) == 0 and json.loads(capsys.readouterr().out)["$id"] == SCHEMA_URI
    assert main([]) == 2
    # a file that is no kdcli report at all
    other = _write(tmp_path, {"name": "x"}, "other.json")
    assert main([str(other)]) == 2 and "other.json: not a kdcli report" in capsys.readouterr().err


def test_older_and_teacherless_reports_still_read(exported, tmp_path):
    raw = copy.deepcopy(exported[3])
    del raw["$schema"]  # written before $schema existed: version 1 all the same
    assert load_report(_write(tmp_path, raw)).schema_uri == SCHEMA_URI
    # the fields version 1 has always allowed to be absent (earlier reports lack teacher_pytorch)
    for key in ("external_data", "export_notes", "graph"):
        del raw["student"][key]
    del raw["student_int8"]
    del raw["student"]["verification"]["top1_ties"], raw["student"]["verification"]["atol"]
    del raw["accuracy"]["teacher_pytorch"], raw["accuracy"]["drop_pt"]
    for stats in raw["latency"]["onnxruntime"]["CPUExecutionProvider"]["student"].values():
        del stats["mean_ms"], stats["min_ms"], stats["p25_ms"], stats["p75_ms"]
    older = parse_report(raw)
    assert older.accuracy.teacher_pytorch is None and older.student.export_notes == []
    assert older.student.graph is None and older.student_int8 is None
    assert check_gates(older, ["accuracy_drop > 100", "speedup < 0"]) == []
    raw.update(teacher=None, ratios=None, accuracy=None, notes=[])
    assert parse_report(raw).teacher is None
    # a 0 ms median gives an infinite throughput: written as json.dumps writes it, and read back
    cpu = raw["latency"]["onnxruntime"]["CPUExecutionProvider"]
    cpu["student"]["1"]["throughput"] = math.inf
    report = load_report(_write(tmp_path, json.dumps(raw)))
    assert report.latency.onnxruntime["CPUExecutionProvider"]["student"]["1"].throughput == math.inf
    assert "Infinity" in json.dumps(report.to_json())


def test_every_gate_name_resolves_on_a_real_report(exported):
    _, report, _, _ = exported
    cpu = report.latency.onnxruntime["CPUExecutionProvider"]
    expected = {
        "accuracy_drop": report.accuracy.drop_pt, "student_accuracy": 100 * report.accuracy.student_onnx,
        "speedup": report.latency.speedup["CPUExecutionProvider"]["4"],
        "speedup@N": report.latency.speedup["CPUExecutionProvider"]["1"],
        "size_ratio": report.ratios.size, "macs_ratio": report.ratios.macs, "params_ratio": report.ratios.params,
        "latency_ms": cpu["student"]["1"].median_ms, "latency_ms@N": cpu["student"]["1"].median_ms,
        "accuracy": 100 * report.accuracy.student_onnx,
    }
    assert set(METRICS) == set(expected)
    for name, want in expected.items():
        value = metric_value(report, name.replace("@N", "@1"))
        assert math.isfinite(value) and value == pytest.approx(want), name
    assert check_gates(report, [f"{n.replace('@N', '@4')} > 1e12" for n in METRICS]) == []


def test_html_is_self_contained_with_svg_charts(exported):
    out, report, _, _ = exported
    page = (out / "report.html").read_text()
    # what the page shows, from the report's own figures: ratios, a latency, the failed gate (escaped)
    cpu = report.latency.onnxruntime["CPUExecutionProvider"]
    assert f"{report.ratios.macs:.3f}" in page and f"{cpu['student']['1'].median_ms:.3f}" in page
    assert "student_accuracy &lt; 101" in page and "student_accuracy < 101" not in page
    assert page.count("<svg") == 2  # latency by batch size, accuracy against MACs
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script|<link|@import|url\(|\bsrc=|\bhref=", page, re.I)
    assert "Median latency by batch size" in page and "Accuracy against size" in page
    assert "teacher (CPU)" in page and "student (PyTorch)" in page


def test_markdown_and_terminal_table(exported):
    out, report, _, _ = exported
    md = (out / "report.md").read_text()
    assert md.startswith("# kdcli export report: mlp")
    assert f"| MACs | 8.64k | 1.11k | {report.ratios.macs:.3f}× |" in md
    assert "| 4 | " in md and "Accuracy on 40 evaluation samples." in md
    assert "❌ gate 'student_accuracy < 101' failed" in md
    table = summary_table(report)
    assert [c.header for c in table.columns] == ["", "teacher", "student", "ratio"]
    assert table.row_count == 5 + 2  # params, MACs, size, 2 accuracy rows; latency at batch 1 and 4
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(table)
    assert "latency @4 (ms, CPU)" in console.export_text()
    assert f"{report.latency.onnxruntime['CPUExecutionProvider']['student']['4'].median_ms:.3f}" in md


def test_export_without_data_or_teacher_notes_random_verification(tmp_path):
    torch.manual_seed(1)
    student = build_model("lenet5", {}, input_shape=(1, 28, 28), num_classes=10).eval()
    info = {"name": "lenet5", "input_shape": [1, 28, 28], "num_classes": 10, "mean": None, "std": None,
            "class_names": None}
    report = export_report(student, info, tmp_path, batch_sizes=(1, 2), time_budget_s=0.02,
                           gates=["latency_ms > 1e9"])
    assert report.gates.expressions == ["latency_ms > 1e9"] and report.gates.failures == []
    assert report.teacher is None and report.ratios is None and report.accuracy is None
    assert report.student.verification.inputs == "random"
    assert any("random inputs" in n for n in report.notes)
    assert load_report(tmp_path / "report.json") == report
    assert "<svg" in (tmp_path / "report.html").read_text()
    with pytest.raises(InputError, match="gate 'speedup < 2'.*teacher"):
        check_gates(report, ["speedup < 2"])
    with pytest.raises(InputError, match="bogus"):  # a typo fails before any export
        export_report(student, info, tmp_path / "never", gates=["bogus < 1"])
    assert not (tmp_path / "never").exists()


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


def _convnet(widths, seed=0):
    torch.manual_seed(seed)
    layers, c = [], SHAPE[0]
    for w in widths:
        layers += [torch.nn.Conv2d(c, w, 3, padding=1), torch.nn.ReLU()]
        c = w
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 3)).eval()


@pytest.mark.parametrize("machine, capability, expected", [
    ("x86_64", "AVX512", (16, "AVX-512")), ("AMD64", "AVX2", (8, "AVX2")), ("x86_64", "DEFAULT", None),
    ("aarch64", "AVX512", None)])
def test_the_channel_block_follows_the_cpu(monkeypatch, machine, capability, expected):
    from kdcli.export.latency import cpu_channel_block

    monkeypatch.setattr("platform.machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_channel_block() == expected


def test_a_student_off_the_hosts_channel_block_is_warned_about_in_every_report(tmp_path, monkeypatch):
    """onnxruntime runs a convolution in its blocked layout only when its output channels are a
    multiple of the host's block (16 with AVX-512): the export report records the count of
    convolutions off the block, and a student with more of them than its teacher gets one warning
    line, in the export's notes and in compress's reports, naming the block and round_to."""
    from kdcli.reports.compress import data_lines

    monkeypatch.setattr("kdcli.export.onnx.cpu_channel_block", lambda: (16, "AVX-512"))
    teacher, x = _convnet([16, 32, 48]), torch.randn(8, *SHAPE)
    reports = {}
    for name, widths in {"off": [8, 24, 48], "on": [16, 16, 32]}.items():
        out = tmp_path / name
        reports[name] = export_report(_convnet(widths), INFO, out, teacher=teacher, teacher_info=INFO, x_eval=x,
                                      y_eval=teacher(x).argmax(1), batch_sizes=(1,), time_budget_s=0.01, threads=1)
    off, on = reports["off"], reports["on"]
    block = off.latency.channel_block
    assert (block.channels, block.isa, block.convolutions, block.student_off, block.teacher_off) == (16, "AVX-512", 3, 2, 0)
    line = next(n for n in off.notes if "channel block" in n)
    assert line.startswith("student: 2 of 3 convolutions have output widths that are not a multiple of 16")
    assert "(AVX-512; the teacher: 0)" in line and "prune.round_to: 16" in line
    assert line in (tmp_path / "off" / "report.md").read_text()
    assert load_report(tmp_path / "off" / "report.json").latency.channel_block == block
    assert on.latency.channel_block.student_off == 0 and not any("channel block" in n for n in on.notes)

    class Run:  # what compress's reports read: the run's export report as JSON
        steps, data = [], {}

        def __init__(self, report):
            self.export = report.to_json()

    assert f"warning: {line}" in data_lines(Run(off))
    assert not any("channel block" in w for w in data_lines(Run(on)))


def test_without_a_known_block_the_report_records_none(tmp_path, monkeypatch):
    monkeypatch.setattr("kdcli.export.onnx.cpu_channel_block", lambda: None)
    report = export_report(_convnet([8]), INFO, tmp_path, batch_sizes=(1,), time_budget_s=0.01, threads=1)
    assert report.latency.channel_block is None and not any("channel block" in n for n in report.notes)
