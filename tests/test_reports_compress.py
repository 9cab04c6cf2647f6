"""The ``kdcli compress`` report (kdcli.reports.compress) from a CompressResult built by hand:
the JSON, the Markdown tables, the HTML page and its chart, and the terminal summary."""

from __future__ import annotations

import io
import json
import re


from kdcli.dkdp.compress import CompressResult
from kdcli.reports.compress import (SCHEMA_URI, SCHEMA_VERSION, render_html, render_markdown, summary_rows,
                                    summary_table, write_compress_report)
from kdcli.reports.compress_model import load_compress_report

TEACHER = {"model": "mlp", "macs": 85514, "params": 85002, "val_accuracy": 0.98, "test_accuracy": 0.9}


def _step(step, attempt, tau, macs, params, acc, accepted, reason):
    """A step record as the DKDP loop logs it (StepRecord as a dict), figures relative to TEACHER."""
    return {"step": step, "attempt": attempt, "tau": tau, "aggressiveness": 1.0, "target_macs": None,
            "macs": macs, "params": params, "macs_ratio": macs / TEACHER["macs"],
            "params_ratio": params / TEACHER["params"], "val_accuracy": acc,
            "accuracy_drop": TEACHER["val_accuracy"] - acc, "accepted": accepted, "reason": reason,
            "seconds": 0.1, "latency_ms": None, "train_history": [], "teacher_val_accuracy": None}


# Three attempts: step 1 kept; step 2 too aggressive at first (undone), then kept at a smaller τ.
STEPS = [
    _step(1, 1, 0.8381, 42757, 42000, 0.975, True, "accuracy held (drop 0.50 pt): aggressiveness raised to 1.5"),
    _step(2, 2, 1.25, 17103, 16800, 0.80, False, "accuracy drop 18.00 pt > 2.00 pt a step may leave: undone"),
    _step(2, 3, 0.9, 25654, 25300, 0.97, True, "accuracy held (drop 1.00 pt)"),
]
STUDENT = {"model": "mlp", "file": "student.kdc", "from": "steps/final.kdc", "macs": 25654, "params": 25300,
           "val_accuracy": 0.972, "macs_ratio": 25654 / 85514, "params_ratio": 25300 / 85002, "test_accuracy": 0.91}


def _result(tmp_path, **kw) -> CompressResult:
    args = dict(run_dir=tmp_path, teacher=dict(TEACHER), student=dict(STUDENT), steps=[dict(s) for s in STEPS],
                target_met=True, gate_failures=[])
    return CompressResult(**{**args, **kw})


def _md_table(md: str, header_start: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with ``header_start``."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_json_is_the_result_with_its_schema_version(tmp_path):
    """compress_report.json holds every field of the result, as written, after $schema and
    schema_version; it reads back through its typed model."""
    res = _result(tmp_path, vid_lambda={"matrix": [[0.25], [0.75]], "teacher_layers": ["t1", "t2"],
                                        "student_layers": ["s1"], "learned": True})
    write_compress_report(res, tmp_path)
    obj = json.loads((tmp_path / "compress_report.json").read_text())
    assert list(obj)[:2] == ["$schema", "schema_version"] and list(obj)[2:] == list(res.to_json())
    assert obj["$schema"] == SCHEMA_URI == "urn:kdcli:schema:compress-report:1"
    assert obj["schema_version"] == SCHEMA_VERSION == 1
    report = load_compress_report(tmp_path / "compress_report.json")
    assert report.to_json() == obj and report.steps[1].accepted is False and report.student.from_ == "steps/final.kdc"
    assert obj["run_dir"] == str(tmp_path)
    assert obj["teacher"] == TEACHER and obj["student"] == STUDENT and obj["steps"] == STEPS
    assert obj["target_met"] is True and obj["gate_failures"] == [] and obj["export"] is None
    assert obj["vid_lambda"]["matrix"] == [[0.25], [0.75]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compress_report.html", "compress_report.json",
                                                          "compress_report.md"]


def test_markdown_has_the_summary_and_one_row_per_step(tmp_path):
    """The verdict, teacher against student, and each attempt's τ, MACs ratio, accuracy and
    whether it was kept, in the order they ran."""
    write_compress_report(_result(tmp_path), tmp_path)
    md = (tmp_path / "compress_report.md").read_text()
    assert md.startswith("# kdcli compress report\n\n**Target met**\n")
    summary = {r[0]: r[1:] for r in _md_table(md, "| | teacher | student |")}
    assert summary["model"] == ["mlp", "mlp (steps/final.kdc)"]
    assert summary["val accuracy"] == ["98.00%", "97.20%"]
    assert summary["test accuracy"] == ["90.00%", "91.00%"]
    assert summary["parameters"] == ["85,002", "25,300 (0.298×)"]   # 25300 / 85002 = 0.2976
    assert summary["MACs"] == ["85,514", "25,654 (0.300×)"]          # 25654 / 85514 = 0.29999
    assert "ONNX file" not in summary                                # nothing was exported
    steps = _md_table(md, "| step | attempt | τ |")
    assert steps == [
        ["1", "1", "0.8381", "0.500", "42,000", "97.50%", "0.50", "yes", STEPS[0]["reason"]],
        ["2", "2", "1.2500", "0.200", "16,800", "80.00%", "18.00", "no", STEPS[1]["reason"]],
        ["2", "3", "0.9000", "0.300", "25,300", "97.00%", "1.00", "yes", STEPS[2]["reason"]],
    ]
    assert "VID layer weights" not in md  # no VID term, no λ section


def test_markdown_lambda_table_and_a_reason_with_a_pipe(tmp_path):
    """λ gets a teacher × student table; a '|' inside a reason does not split its cell."""
    steps = [dict(STEPS[0], reason="kept | raised")]
    lam = {"matrix": [[0.1, 0.6], [0.9, 0.4]], "teacher_layers": ["layer1", "layer2"],
           "student_layers": ["conv1", "conv2"], "learned": True}
    md = render_markdown(_result(tmp_path, steps=steps, vid_lambda=lam))
    assert len(_md_table(md, "| step |")[0]) == 9 and _md_table(md, "| step |")[0][-1] == "kept / raised"
    assert "## VID layer weights λ (learned)" in md
    assert _md_table(md, "| teacher \\ student |") == [["`layer1`", "0.100", "0.600"], ["`layer2`", "0.900", "0.400"]]


def _circles(page: str) -> list[tuple[float, float, str]]:
    """The chart's points: (cx, cy, tooltip) of each <circle>."""
    return [(float(x), float(y), t) for x, y, t in
            re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="3" fill="[^"]+"><title>([^<]*)</title>', page)]


def test_html_chart_has_one_point_per_step(tmp_path):
    """The SVG chart: the teacher, each kept step on the student's line, the undone step on its
    own, and the final student; a point sits where its (MACs ratio, accuracy) puts it."""
    write_compress_report(_result(tmp_path), tmp_path)
    page = (tmp_path / "compress_report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 1 and "<script" not in page
    pts = _circles(page)
    tips = [t for _, _, t in pts]
    # teacher (1.0, 98); the kept line starts at the teacher and visits both kept steps (sorted by x)
    assert tips == ["teacher: (1, 98)",
                    "student (kept steps): (0.3, 97)", "student (kept steps): (0.5, 97.5)",
                    "student (kept steps): (1, 98)",
                    "undone steps: (0.2, 80)",
                    "final student: (0.3, 97.2)"]
    # positions are linear in the data: one scale for x, one for y, across all series
    data = [(1.0, 98.0), (0.3, 97.0), (0.5, 97.5), (1.0, 98.0), (0.2, 80.0), (0.29999, 97.2)]
    (x0, y0), (px0, py0) = data[4], pts[4][:2]
    sx = [(px - px0) / (x - x0) for (px, _, _), (x, _) in zip(pts, data) if x != x0]
    sy = [(py - py0) / (y - y0) for (_, py, _), (_, y) in zip(pts, data) if y != y0]
    assert max(sx) - min(sx) < 0.5 and min(sx) > 0          # further right for more MACs
    assert max(sy) - min(sy) < 0.5 and max(sy) < 0          # higher up (smaller cy) for more accuracy
    # the kept steps are joined by one line; legend names every series once
    assert len(re.findall(r"<polyline ", page)) == 1
    for name in ("teacher", "student (kept steps)", "undone steps", "final student"):
        assert page.count(f'class="lg">{name}</text>') == 1


def test_html_tables_show_the_numbers(tmp_path):
    """The summary and steps tables carry the same figures as the Markdown."""
    page = render_html(_result(tmp_path))
    assert "<p><strong>Target met</strong></p>" in page
    assert "<td>MACs</td><td>85,514</td><td>25,654 (0.300×)</td>" in page
    assert "<td>val accuracy</td><td>98.00%</td><td>97.20%</td>" in page
    assert ("<tr><td>2</td><td>2</td><td>1.2500</td><td>0.200</td><td>16,800</td><td>80.00%</td><td>18.00</td>"
            "<td>no</td>") in page
    assert page.count("<tr><td>") == 5 + 3  # five summary rows (no export), three steps


def test_html_escapes_every_user_string(tmp_path):
    """Model names, reasons, gate failures and layer names come from users: none reaches the page raw."""
    evil = '<img src=x onerror="alert(1)">&'
    res = _result(tmp_path, teacher=dict(TEACHER, model=evil), steps=[dict(STEPS[0], reason=evil)],
                  target_met=False, gate_failures=[f"gate {evil} failed"],
                  vid_lambda={"matrix": [[1.0]], "teacher_layers": [evil], "student_layers": ["<b>s</b>"],
                              "learned": False})
    page = render_html(res)
    assert "<img" not in page and "<b>s</b>" not in page and 'onerror="' not in page
    escaped = "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;"
    assert page.count(escaped) >= 4  # summary cell, step reason, verdict, heatmap row label
    assert f"<strong>Not met: gate {escaped} failed</strong>" in page
    assert "VID layer weights λ (fixed)" in page and "&lt;b&gt;s&lt;/b&gt;" in page


def test_html_without_steps_shows_only_the_final_student(tmp_path):
    """A declared student that was only distilled: no steps table, no kept line, its own point."""
    student = dict(STUDENT, model="cnn3", **{"from": None})
    page = render_html(_result(tmp_path, steps=[], student=student))
    assert "<h2>DKDP steps</h2>" not in page and "<polyline" not in page
    assert [t for _, _, t in _circles(page)] == ["teacher: (1, 98)", "final student: (0.3, 97.2)"]
    assert "cnn3 (as declared)" in page


def test_export_figures_join_the_summary(tmp_path):
    """With an export report: ONNX accuracy, file size and onnxruntime latency per batch size."""
    export = {"teacher": {"size_bytes": 340 * 1024}, "student": {"size_bytes": 3 * (1 << 20)},
              "accuracy": {"teacher_onnx": 0.9, "student_onnx": 0.905},
              "latency": {"primary_provider": "CPUExecutionProvider",
                          "onnxruntime": {"CPUExecutionProvider": {
                              "teacher": {"1": {"median_ms": 0.5}, "64": {"median_ms": 2.25}},
                              "student": {"64": {"median_ms": 1.0}, "1": {"median_ms": 0.125}}}}}}
    rows = {r[0]: r[1:] for r in _md_table(render_markdown(_result(tmp_path, export=export)), "| | teacher |")}
    assert rows["ONNX accuracy"] == ["90.00%", "90.50%"]
    assert rows["ONNX file"] == ["340.0 KiB", "3.00 MiB"]
    assert rows["latency (onnxruntime)"] == ["0.500 ms @1, 2.250 ms @64", "0.125 ms @1, 1.000 ms @64"]


def _table_text(result) -> str:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=140, no_color=True, force_terminal=False).print(summary_table(result))
    return out.getvalue()


def test_summary_table_text(tmp_path):
    """The terminal summary: one line per figure with teacher and student, then the verdict."""
    text = _table_text(_result(tmp_path))
    lines = [" ".join(line.replace("│", " ").split()) for line in text.splitlines()]
    assert "kdcli compress" in lines[0]
    for row in ("model mlp mlp (steps/final.kdc)", "val accuracy 98.00% 97.20%", "test accuracy 90.00% 91.00%",
                "parameters 85,002 25,300 (0.298×)", "MACs 85,514 25,654 (0.300×)"):
        assert row in lines, row
    assert lines[-2] == "target met" or lines[-1] == "target met"
    failed = _table_text(_result(tmp_path, target_met=False, gate_failures=["target not met: MACs 0.300 of "
                                                                           "teacher > target 0.010"]))
    assert "target not met: MACs 0.300 of teacher > target 0.010" in " ".join(failed.split())
    assert "target met\n" not in failed


def test_summary_table_shows_user_strings_literally(tmp_path):
    """A model spec or gate text with brackets is printed as written."""
    res = _result(tmp_path, teacher=dict(TEACHER, model="nets/m[v2].py:make"), target_met=False,
                  gate_failures=["latency [/ms] over budget"])
    text = " ".join(_table_text(res).split())
    assert "nets/m[v2].py:make" in text and "latency [/ms] over budget" in text


def test_markdown_verdict_agrees_with_html_when_a_gate_fails(tmp_path):
    """The resource target was met but an export gate failed: neither rendering calls the run met."""
    res = _result(tmp_path, target_met=True, gate_failures=["speedup@64 < 1.5 (measured 1.2)"])
    assert "Not met: speedup@64 &lt; 1.5 (measured 1.2)" in render_html(res)
    assert "**Target met**" not in render_markdown(res)


def test_a_diverged_step_shows_dashes_not_nan(tmp_path):
    """A step whose training diverged has no accuracy: the tables show '–' and the chart no point."""
    diverged = dict(STEPS[1], val_accuracy=float("nan"), accuracy_drop=float("nan"),
                    reason="diverged: loss is nan at epoch 1")
    res = _result(tmp_path, steps=[STEPS[0], diverged])
    page = render_html(res)
    assert [t for _, _, t in _circles(page)][-1] == "final student: (0.3, 97.2)"
    assert not any(t.startswith("undone steps") for _, _, t in _circles(page))
    row = _md_table(render_markdown(res), "| step |")[1]
    assert row[5:7] == ["–", "–"] and "nan%" not in page.lower()


def test_the_reports_say_which_data_judged_what_and_which_steps_were_forced(tmp_path):
    steps = [dict(s) for s in STEPS]
    steps[2]["forced"] = "the target forced a step over the accuracy budget: drop 3.00 pt > 2.00 pt"
    data = {"splits": {"train": "the training split of cifar10-bin d", "val": "500 of the 1,000 test samples (seed 0)",
                       "test": "the other 500 test samples (disjoint from validation)"},
            "normalization": "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) (data.normalize)",
            "warnings": ["data.val: the teacher scores 99.8% on validation but 91.5% on the test part"]}
    res = _result(tmp_path, steps=steps, data=data)
    md = render_markdown(res)
    section = md[md.index("## Data"):md.index("## DKDP steps")]
    assert "- val: 500 of the 1,000 test samples (seed 0)" in section
    assert "- test: the other 500 test samples" in section and "normalisation: mean (0.485" in section
    assert "- warning: data.val: the teacher scores 99.8%" in section and "- warning: step 2: the target forced" in section
    rows = _md_table(md, "| step")
    assert rows[2][7] == "yes (forced)" and rows[0][7] == "yes" and rows[1][7] == "no"
    write_compress_report(res, tmp_path)
    back = load_compress_report(tmp_path / "compress_report.json")
    assert back.data.splits["val"].startswith("500 of") and back.steps[2].forced.startswith("the target forced")
    assert "<h2>Data</h2>" in (tmp_path / "compress_report.html").read_text()


def test_the_speed_up_is_shown_next_to_the_macs_ratio_and_a_slower_student_is_warned_about(tmp_path):
    export = {"latency": {"primary_provider": "CPUExecutionProvider",
                          "speedup": {"CPUExecutionProvider": {"1": 1.8, "64": 0.92}}}}
    res = _result(tmp_path, export=export)
    row = next(r for r in summary_rows(res) if r[0] == "speed-up (teacher / student)")
    assert row[2].startswith("1.80× @1, 0.92× @64") and "MACs 0.300×" in row[2]
    md = render_markdown(res)
    assert "warning: the student is SLOWER than the teacher in onnxruntime at batch 64 (0.92×)" in md
    fast = _result(tmp_path, export={"latency": {"primary_provider": "CPUExecutionProvider",
                                                 "speedup": {"CPUExecutionProvider": {"1": 1.8, "64": 1.4}}}})
    assert "SLOWER" not in render_markdown(fast)
