"""CI gates against a baseline report: the grammar (baseline arithmetic, refusals naming the gate and
the flag), the noise band of latency gates, JUnit XML, the GitHub step summary, and
``kdcli report diff`` in every format. Most tests work on hand-made typed reports; two real
exports of tiny models (one module fixture) exercise the command line end to end."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.errors import InputError
from kdcli.reports.diff import diff_files, render_markdown
from kdcli.reports.gates import (NOISE_K, check_gates, evaluate_gates, load_baseline, metric_spread, metric_value,
                                 parse_gate, parse_gates)
from kdcli.reports.junit import junit_xml, step_summary
from kdcli.reports.models import ExportReport

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, env=env)


# ------------------------------------------------------------------------------ hand-made reports

def _stats(ms, spread=None):
    """Latency stats with median ``ms`` and quartiles ``ms ± spread`` (None: none recorded, as in
    reports written before the quartiles were)."""
    out = {"median_ms": ms, "p90_ms": ms, "p99_ms": ms, "mean_ms": ms, "min_ms": ms, "throughput": 1.0,
           "runs": 9, "provider": "CPUExecutionProvider", "threads": 2}
    if spread is not None:
        out.update(p25_ms=ms - spread, p75_ms=ms + spread)
    return out


def _model(name, macs):
    return {"name": name, "file": f"{name}.onnx", "size_bytes": 4 * macs, "exporter": "torch.export", "opset": 18,
            "params": macs, "macs": macs, "verification": {"max_abs_diff": 0.0, "top1_agreement": 1.0, "samples": 8,
                                                          "inputs": "data"}}


def _report(student_ms=1.0, teacher_ms=2.0, spread=0.02, acc=0.90, failures=(), teacher_macs=400) -> ExportReport:
    """A report with the student at ``student_ms`` (batch 1) and 4× that at batch 8, the teacher
    (``teacher_macs``: another number is another teacher) at ``teacher_ms``; every median with
    quartiles ± ``spread`` (None: no quartiles)."""
    cpu = {"student": {"1": _stats(student_ms, spread), "8": _stats(4 * student_ms, spread)},
           "teacher": {"1": _stats(teacher_ms, spread), "8": _stats(4 * teacher_ms, spread)}}
    return ExportReport.model_validate({
        "schema": "kdcli/export-report", "version": 1, "created": "2026-01-01T00:00:00+00:00",
        "environment": {"kdcli": "0.1.0", "cpu_threads": 2},
        "student": _model("s", 100), "teacher": _model("t", teacher_macs),
        "ratios": {"size": 0.25, "macs": 0.25, "params": 0.25},
        "accuracy": {"samples": 200, "student_onnx": acc, "student_pytorch": acc, "teacher_onnx": 0.95,
                     "teacher_pytorch": 0.95, "drop_pt": 100 * (0.95 - acc)},
        "latency": {"batch_sizes": [1, 8], "time_budget_s": 1.0, "primary_provider": "CPUExecutionProvider",
                    "onnxruntime": {"CPUExecutionProvider": cpu}, "pytorch": {},
                    "speedup": {"CPUExecutionProvider": {"1": teacher_ms / student_ms, "8": teacher_ms / student_ms}}},
        "gates": {"expressions": [], "failures": list(failures)}, "notes": [],
    })


# ---------------------------------------------------------------------------------------- grammar

@pytest.mark.parametrize("expr,metric,op,base,arith,operand", [
    ("accuracy < baseline.accuracy - 0.3", "accuracy", "<", "accuracy", "-", 0.3),
    ("latency_ms@1 > baseline.latency_ms@1 * 1.05", "latency_ms@1", ">", "latency_ms@1", "*", 1.05),
    ("student_accuracy<baseline.student_accuracy-0.5", "student_accuracy", "<", "student_accuracy", "-", 0.5),
    ("speedup@8 <= baseline.speedup + 1e-1", "speedup@8", "<=", "speedup", "+", 0.1),
    ("accuracy < baseline.student_accuracy", "accuracy", "<", "student_accuracy", None, None),  # the alias
])
def test_parse_baseline_gate(expr, metric, op, base, arith, operand):
    g = parse_gate(expr)
    assert (g.metric, g.op, g.base, g.arith, g.operand, g.value) == (metric, op, base, arith, operand, None)
    assert g.uses_baseline and not parse_gate("speedup < 2").uses_baseline


def test_baseline_arithmetic():
    assert parse_gate("accuracy < baseline.accuracy - 0.3").rhs(90.0) == pytest.approx(89.7)
    assert parse_gate("accuracy < baseline.accuracy + 2").rhs(90.0) == pytest.approx(92.0)
    assert parse_gate("latency_ms > baseline.latency_ms * 1.05").rhs(2.0) == pytest.approx(2.1)
    assert parse_gate("latency_ms > baseline.latency_ms").rhs(2.0) == 2.0
    # the spread of the right side: scaled by * n, unchanged by ± n
    assert parse_gate("latency_ms > baseline.latency_ms * 2").rhs_spread(0.1) == pytest.approx(0.2)
    assert parse_gate("latency_ms > baseline.latency_ms + 2").rhs_spread(0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("expr,why", [
    ("accuracy < baseline.accuracy / 2", "expected"),               # no division
    ("accuracy < baseline.accuracy - baseline.accuracy", "expected"),
    ("accuracy < baseline accuracy", "expected"),
    ("accuracy < baseline.__class__", "unknown metric '__class__'"),  # never evaluated
    ("accuracy < baseline.bogus - 1", "unknown metric 'bogus'"),
    ("baseline.accuracy > accuracy", "expected"),                    # the baseline is the right side
    ("latency_ms > baseline.speedup * 2", r"latency_ms \(ms\) with baseline.speedup \(×\)"),
    ("accuracy < baseline.accuracy_drop", "same unit"),
])
def test_malformed_baseline_gate_names_the_gate(expr, why):
    with pytest.raises(InputError, match=why) as info:
        parse_gate(expr)
    assert repr(expr) in str(info.value)


def test_baseline_gate_without_baseline_names_the_gate_and_the_flag():
    with pytest.raises(InputError) as info:
        parse_gates(["speedup < 2", "accuracy < baseline.accuracy - 0.3"])
    msg = str(info.value)
    assert "'accuracy < baseline.accuracy - 0.3'" in msg and "--baseline" in msg and "\n" not in msg
    with pytest.raises(InputError, match="--baseline"):
        check_gates(_report(), ["latency_ms > baseline.latency_ms"])
    assert parse_gates(["speedup < 2"]) and parse_gates([]) == []  # no baseline needed


def test_baseline_side_is_read_before_any_work():
    teacherless = _report()
    teacherless.teacher = None
    with pytest.raises(InputError, match=r"baseline old/report.json.*teacher"):
        parse_gates(["speedup < baseline.speedup"], teacherless, "old/report.json")
    without_data = _report()
    without_data.accuracy = None
    with pytest.raises(InputError, match=r"\(baseline b.json\): the report has no accuracy"):
        parse_gates(["accuracy < baseline.accuracy - 1"], without_data, "b.json")


def test_load_baseline_refuses_a_missing_or_foreign_file_in_one_line(tmp_path):
    with pytest.raises(InputError, match=r"^--baseline .*nope.json: file not found$"):
        load_baseline(tmp_path / "nope.json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"$schema": "urn:kdcli:schema:analysis:1", "schema_version": 1}))
    with pytest.raises(InputError, match=r"^--baseline .*other.json: .*not a kdcli export report"):
        load_baseline(other)
    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": 1}')
    with pytest.raises(InputError, match=r"--baseline .*junk.json") as info:
        load_baseline(junk)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ evaluation

def test_accuracy_gates_against_a_baseline():
    base, now = _report(acc=0.90), _report(acc=0.895)
    assert metric_value(now, "accuracy") == pytest.approx(89.5)
    assert check_gates(now, ["accuracy < baseline.accuracy - 1"], base) == []
    [fail] = check_gates(now, ["accuracy < baseline.accuracy - 0.3"], base)
    assert fail == ("gate 'accuracy < baseline.accuracy - 0.3' failed: accuracy = 89.5, baseline 90 − 0.3 = 89.7")
    # accuracy has no noise band: an accuracy change of any size counts
    assert check_gates(now, ["student_accuracy < baseline.student_accuracy"], base) != []
    assert check_gates(now, ["accuracy_drop > baseline.accuracy_drop + 0.4"], base) != []


def test_spreads_are_half_the_interquartile_range():
    r = _report(student_ms=1.0, teacher_ms=2.0, spread=0.05)
    assert metric_spread(r, "latency_ms@1") == pytest.approx(0.05)
    assert metric_spread(r, "latency_ms@8") == pytest.approx(0.05)
    # speed-up 2 carries the student's relative spread 0.05 (the teacher's is the same load)
    assert metric_spread(r, "speedup@1") == pytest.approx(2 * 0.05)
    assert metric_spread(r, "accuracy") is None
    assert metric_spread(_report(spread=None), "latency_ms") is None


def test_latency_worse_by_far_fails_beyond_the_noise_band():
    # another teacher: no drift correction, the noise band alone
    base, now = _report(student_ms=1.71, spread=0.03), _report(student_ms=1.92, spread=0.04, teacher_macs=500)
    gate = "latency_ms@1 > baseline.latency_ms@1 * 1.05"
    [r] = evaluate_gates(now, [gate], base, "main/report.json")
    band = NOISE_K * (0.04 ** 2 + (0.03 * 1.05) ** 2) ** 0.5
    assert not r.passed and r.band == pytest.approx(band) and r.threshold == pytest.approx(1.71 * 1.05)
    assert r.message == (f"gate '{gate}' failed: latency_ms@1 = 1.92 (spread ±0.04), baseline 1.71 (±0.03) × 1.05 "
                         f"= 1.796; beyond the noise band (±{band:.4g})")
    assert check_gates(now, [gate], base) == [r.message]


def test_latency_equal_within_the_spread_passes_saying_so():
    base, now = _report(student_ms=1.00, spread=0.05), _report(student_ms=1.08, spread=0.05, teacher_macs=500)
    gate = "latency_ms@1 > baseline.latency_ms@1 * 1.05"  # 1.08 > 1.05: over, but inside the band (±0.14)
    [r] = evaluate_gates(now, [gate], base)
    assert r.passed and "within the noise band" in r.message and "off by 0.03" in r.message
    # a plain comparison would have failed it
    assert check_gates(_report(student_ms=1.08, spread=None), [gate], _report(student_ms=1.0, spread=None)) != []
    # a clear pass says the band too, without "within"
    [ok] = evaluate_gates(_report(student_ms=0.9, spread=0.05), [gate], base)
    assert ok.passed and "(noise band ±" in ok.message and "within" not in ok.message


def test_latency_baseline_is_rescaled_by_the_teachers_drift():
    gate = "latency_ms@1 > baseline.latency_ms@1 * 1.05"
    base = _report(student_ms=1.0, teacher_ms=2.0, spread=0.01)
    # this run's machine is 1.5× slower (the same teacher: 2 → 3 ms); the student is not worse
    [r] = evaluate_gates(_report(student_ms=1.5, teacher_ms=3.0, spread=0.01), [gate], base)
    assert r.passed and r.drift == pytest.approx(1.5) and r.threshold == pytest.approx(1.5 * 1.05)
    assert "× 1.5 (the teacher's drift, 2 → 3 ms) = 1.5 × 1.05 = 1.575" in r.message
    # the same student time on an unchanged machine is a regression
    [bad] = evaluate_gates(_report(student_ms=1.5, teacher_ms=2.0, spread=0.01), [gate], base)
    assert not bad.passed and bad.drift == pytest.approx(1.0) and "beyond the noise band" in bad.message
    # another teacher tells nothing about the machine: absolute medians
    [other] = evaluate_gates(_report(student_ms=1.5, teacher_ms=3.0, spread=0.01, teacher_macs=500), [gate], base)
    assert not other.passed and other.drift is None and "drift" not in other.message
    # the baseline's spread is rescaled with it (the teacher's own jitter is not counted again)
    assert r.band == pytest.approx(NOISE_K * (0.01 ** 2 + (1.05 * 1.5 * 0.01) ** 2) ** 0.5)


def test_speedup_against_a_baseline_allows_for_noise():
    base = _report(student_ms=1.0, teacher_ms=3.0, spread=0.05)     # speed-up 3
    slightly = _report(student_ms=1.05, teacher_ms=3.0, spread=0.05)  # 2.86: inside the band
    far = _report(student_ms=2.0, teacher_ms=3.0, spread=0.05)       # 1.5
    gate = "speedup@1 < baseline.speedup@1 - 0.05"
    assert check_gates(slightly, [gate], base) == []
    [fail] = check_gates(far, [gate], base)
    assert "beyond the noise band" in fail and "speedup@1 = 1.5" in fail


def test_old_report_without_spread_compares_plainly():
    old_base = _report(student_ms=1.0, spread=None)  # written before p25/p75 were recorded
    gate = "latency_ms@1 > baseline.latency_ms@1 * 1.05"
    [r] = evaluate_gates(_report(student_ms=1.06, spread=0.05), [gate], old_base)
    assert not r.passed and r.band is None and r.message.endswith("no spread recorded, plain comparison")
    assert r.drift == 1.0  # the teacher's drift needs no spread
    [ok] = evaluate_gates(_report(student_ms=1.04, spread=0.05), [gate], old_base)
    assert ok.passed and "no spread recorded" in ok.message


def test_plain_gates_keep_their_messages_and_equality_ignores_the_band():
    r = _report(student_ms=1.0, spread=0.5)
    assert check_gates(r, ["latency_ms > 0.9"]) == ["gate 'latency_ms > 0.9' failed: latency_ms = 1"]
    base = _report(student_ms=1.0001, spread=0.5)
    assert check_gates(r, ["latency_ms != baseline.latency_ms"], base) != []  # == / != compare plainly


def test_nan_fails_a_baseline_gate():
    now = _report()
    now.accuracy.student_onnx = float("nan")
    assert check_gates(now, ["accuracy < baseline.accuracy - 1"], _report()) != []


# ------------------------------------------------------------------------------- JUnit and summary

def test_junit_xml_has_one_testcase_per_gate():
    base = _report(student_ms=1.0)
    gates = ["speedup@1 < 1.5", "latency_ms@1 > baseline.latency_ms@1 * 1.05", "accuracy < baseline.accuracy - 5",
             "size_ratio > 0.1"]
    results = evaluate_gates(_report(student_ms=3.0), gates, base, "b.json")
    root = ET.fromstring(junit_xml(results, timestamp="2026-01-01T00:00:00+00:00", time_s=1.5,
                                   properties={"baseline": "b.json"}))
    suite = root.find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "3" and suite.get("errors") == "0"
    assert suite.get("timestamp") == "2026-01-01T00:00:00+00:00" and float(suite.get("time")) == 1.5
    assert suite.find("properties/property").attrib == {"name": "baseline", "value": "b.json"}
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == gates and {c.get("classname") for c in cases} == {"kdcli.gates"}
    failed = {c.get("name"): c.find("failure") for c in cases}
    assert failed["accuracy < baseline.accuracy - 5"] is None
    assert cases[2].find("system-out").text.startswith("gate 'accuracy < baseline.accuracy - 5' passed")
    msg = failed["latency_ms@1 > baseline.latency_ms@1 * 1.05"].get("message")
    assert msg.startswith("gate 'latency_ms@1 > baseline.latency_ms@1 * 1.05' failed") and "noise band" in msg
    empty = ET.fromstring(junit_xml([], timestamp="t"))
    assert empty.find("testsuite").get("tests") == "0"


def test_step_summary_replaces_the_gates_section():
    from kdcli.reports.export import render_markdown as report_md

    now = _report(student_ms=3.0, failures=["x"])
    now.gates.expressions = ["latency_ms@1 > baseline.latency_ms@1 * 1.05", "accuracy < baseline.accuracy - 5"]
    results = evaluate_gates(now, now.gates.expressions, _report(), "main/report.json")
    now.gates.failures = [r.message for r in results if not r.passed]
    text = step_summary(report_md(now), results, "main/report.json")
    assert text.count("## Gates") == 1 and "## Gates: 1 of 2 passed" in text
    assert "- ✅ gate 'accuracy < baseline.accuracy - 5' passed" in text and "`main/report.json`" in text
    assert text.index("## Gates") < text.index("<sub>")


def test_unwritable_step_summary_is_a_warning(monkeypatch, tmp_path):
    from kdcli.cli import _ci_outputs
    from kdcli.console import Reporter

    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "no" / "such" / "dir" / "summary.md"))
    err = io.StringIO()
    _ci_outputs(_report(), [], junit=None, seconds=0.0, baseline=None, out=tmp_path, rep=Reporter(stream=err))
    assert err.getvalue().startswith("warning: GITHUB_STEP_SUMMARY ") and err.getvalue().count("\n") == 1


# ---------------------------------------------------------------------------------- report diff

def _write(path: Path, report: ExportReport) -> Path:
    path.write_text(json.dumps(report.to_json()))
    return path


def test_diff_marks_what_got_worse(tmp_path):
    a = _write(tmp_path / "a.json", _report(student_ms=1.0, spread=0.02, acc=0.90))
    b = _write(tmp_path / "b.json", _report(student_ms=1.5, spread=0.02, acc=0.91, failures=["gate 'x' failed"]))
    diff = diff_files(a, b)
    rows = {(r.section, r.name): r for r in diff.rows}
    lat = rows[("latency CPU (median ms)", "student @1")]
    assert (lat.a, lat.b, lat.change) == (1.0, 1.5, "worse") and lat.pct == pytest.approx(50.0)
    assert rows[("accuracy (ONNX)", "student")].change == "better"
    assert rows[("latency CPU (median ms)", "teacher @1")].change == ""
    assert rows[("latency CPU (median ms)", "speed-up @1")].change == "worse"
    assert rows[("gates", "failed")].change == "worse"
    assert rows[("student", "MACs")].change == ""
    # a latency change inside the noise band is marked as noise, not as worse
    c = _write(tmp_path / "c.json", _report(student_ms=1.01, spread=0.02, acc=0.90))
    near = {(r.section, r.name): r for r in diff_files(a, c).rows}[("latency CPU (median ms)", "student @1")]
    assert near.change == "noise" and diff_files(a, c).worse == []


def test_diff_formats(tmp_path):
    a = _write(tmp_path / "a.json", _report(student_ms=1.0))
    b = _write(tmp_path / "b.json", _report(student_ms=2.0))
    res = invoke("report", "diff", a, b, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["kind"] == "export-report" and out["a"] == str(a) and out["worse"] >= 1
    row = next(r for r in out["rows"] if r["name"] == "student @1")
    assert row["delta"] == pytest.approx(1.0) and row["pct"] == pytest.approx(100.0) and row["change"] == "worse"
    assert json.loads(invoke("report", "diff", a, b, "--format", "json").stdout) == out
    md = invoke("report", "diff", a, b, "--format", "markdown")
    assert md.exit_code == 0 and md.stdout == render_markdown(diff_files(a, b))
    assert "| latency CPU (median ms) | student @1 | 1.000 | 2.000 | +1.000 | +100.0% | **✗ worse** |" in md.stdout
    table = invoke("report", "diff", a, b)
    assert table.exit_code == 0 and "student @1" in table.stdout and "worse" in table.stdout
    same = invoke("report", "diff", a, a, "--format", "markdown")
    assert "Nothing worse in B." in same.stdout


def test_diff_of_bad_files_is_one_line_exit_2(tmp_path):
    a = _write(tmp_path / "a.json", _report())
    for bad, why in [(tmp_path / "missing.json", "file not found"), (tmp_path / "junk.json", "not valid JSON")]:
        if bad.name == "junk.json":
            bad.write_text("{")
        res = invoke("report", "diff", a, bad)
        assert res.exit_code == 2 and why in res.output and res.output.count("\n") == 1
    res = invoke("report", "diff", a, a, "--format", "yaml")
    assert res.exit_code == 2 and "--format" in res.output
    compress = tmp_path / "compress_report.json"
    compress.write_text(json.dumps(_compress_report()))
    res = invoke("report", "diff", a, compress)
    assert res.exit_code == 2 and "same kind" in res.output and res.output.count("\n") == 1


def _compress_report(test_acc=0.91, macs=25654, export=None) -> dict:
    teacher = {"model": "mlp", "macs": 85514, "params": 85002, "val_accuracy": 0.98, "test_accuracy": 0.92}
    student = {"model": "mlp", "file": "student.kdc", "from": "steps/final.kdc", "macs": macs, "params": macs,
               "val_accuracy": 0.97, "macs_ratio": macs / 85514, "params_ratio": macs / 85002,
               "test_accuracy": test_acc}
    return {"$schema": "urn:kdcli:schema:compress-report:1", "schema_version": 1, "run_dir": "runs/x",
            "teacher": teacher, "student": student, "steps": [], "target_met": True, "gate_failures": [],
            "export": export, "vid_lambda": None}


def test_diff_of_compress_reports_includes_their_exports(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_compress_report(export=_report(student_ms=1.0).to_json())))
    b.write_text(json.dumps(_compress_report(test_acc=0.89, macs=30000, export=_report(student_ms=2.0).to_json())))
    diff = diff_files(a, b)
    assert diff.kind == "compress-report"
    worse = {(r.section, r.name) for r in diff.worse}
    assert {("student", "test accuracy"), ("student", "MACs"), ("export · latency CPU (median ms)", "student @1")} <= worse


# ------------------------------------------------------------------------ end to end, two exports

TINY_RECIPE = """\
seed: 0
data: {source: digits, val_fraction: 0.15}
teacher: {model: mlp, model_args: {hidden: [32]}}
export: {batch_sizes: [1], latency_budget_s: 0.05}
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A baseline export of a tiny student and teacher (digits, batch size 1), then an export of the
    same student against it with passing and failing gates, --junit and GITHUB_STEP_SUMMARY set."""
    import torch

    from kdcli.models import build_model
    from kdcli.models.file import save_model_file

    root = tmp_path_factory.mktemp("ci")
    (root / "recipe.yaml").write_text(TINY_RECIPE)
    torch.manual_seed(0)
    for name, hidden in (("teacher", [32]), ("student", [8])):
        m = build_model("mlp", {"hidden": hidden}, input_shape=(1, 8, 8), num_classes=10)
        save_model_file(root / f"{name}.kdc", m, name="mlp", args={"hidden": hidden}, input_shape=(1, 8, 8),
                        num_classes=10)
    common = [root / "student.kdc", "--teacher", root / "teacher.kdc", "--recipe", root / "recipe.yaml"]
    base = invoke("export", *common, "--out", root / "base")
    assert base.exit_code == 0, base.output
    summary = root / "summary.md"
    summary.write_text("earlier step\n")
    gates = ["accuracy < baseline.accuracy - 0.3",              # the same model and data: passes
             "latency_ms@1 > baseline.latency_ms@1 * 1000",     # passes unless the machine is 1000× slower
             "accuracy > baseline.accuracy - 50",               # always true: fails
             "macs_ratio > 0.01"]                               # fails
    now = invoke("export", *common, "--out", root / "now", "--baseline", root / "base" / "report.json",
                 *[a for g in gates for a in ("--fail-if", g)], "--junit", root / "junit" / "gates.xml",
                 env={"GITHUB_STEP_SUMMARY": str(summary)})
    return root, gates, now


def test_export_with_baseline_gates_exits_3_and_reports_each_gate(exports):
    root, gates, res = exports
    assert res.exit_code == 3, res.output
    err = res.stderr
    assert "gate 'accuracy < baseline.accuracy - 0.3' passed" in err
    assert "gate 'latency_ms@1 > baseline.latency_ms@1 * 1000' passed: latency_ms@1 = " in err and "spread ±" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: gate 'accuracy > baseline.accuracy - 50' failed") and "macs_ratio > 0.01" in last
    report = json.loads((root / "now" / "report.json").read_text())
    assert report["gates"]["expressions"] == gates and len(report["gates"]["failures"]) == 2
    stats = report["latency"]["onnxruntime"]["CPUExecutionProvider"]["student"]["1"]
    assert stats["p25_ms"] <= stats["median_ms"] <= stats["p75_ms"]  # the quartiles the spread comes from


def test_export_writes_junit_even_when_gates_fail(exports):
    root, gates, _ = exports
    suite = ET.parse(root / "junit" / "gates.xml").getroot().find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "2"
    fails = {c.get("name"): c.find("failure") for c in suite.findall("testcase")}
    assert list(fails) == gates
    assert fails[gates[0]] is None and fails[gates[1]] is None
    assert fails[gates[3]].get("message").startswith("gate 'macs_ratio > 0.01' failed: macs_ratio = 0.")
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["baseline"] == str(root / "base" / "report.json")


def test_export_appends_to_the_github_step_summary(exports):
    root, _, _ = exports
    text = (root / "summary.md").read_text()
    assert text.startswith("earlier step\n# kdcli export report: mlp")  # appended, not replaced
    assert "## Gates: 2 of 4 passed" in text and "- ❌ gate 'macs_ratio > 0.01' failed" in text
    assert f"Compared with the baseline `{root / 'base' / 'report.json'}`." in text


def test_report_diff_of_two_real_exports(exports):
    root, _, _ = exports
    res = invoke("report", "diff", root / "base" / "report.json", root / "now" / "report.json", "--json")
    assert res.exit_code == 0, res.output
    rows = {(r["section"], r["name"]): r for r in json.loads(res.stdout)["rows"]}
    assert rows[("accuracy (ONNX)", "student")]["change"] == ""  # the same model on the same data
    assert rows[("gates", "failed")]["a"] == 0 and rows[("gates", "failed")]["b"] == 2
    assert rows[("latency CPU (median ms)", "student @1")]["a_spread"] is not None


def test_cli_refuses_baseline_gates_without_baseline_and_bad_baselines(tmp_path):
    res = invoke("export", tmp_path / "s.kdc", "--fail-if", "latency_ms@1 > baseline.latency_ms@1 * 1.05",
                 "--out", tmp_path / "o")
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "'latency_ms@1 > baseline.latency_ms@1 * 1.05'" in res.output and "--baseline" in res.output
    res = invoke("export", tmp_path / "s.kdc", "--baseline", tmp_path / "missing.json", "--out", tmp_path / "o")
    assert res.exit_code == 2 and f"--baseline {tmp_path / 'missing.json'}: file not found" in res.output
    res = invoke("export", tmp_path / "s.kdc", "--junit", tmp_path, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "--junit" in res.output and "directory" in res.output
