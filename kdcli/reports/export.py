"""The export report rendered as JSON, Markdown, HTML and a rich table.

The data model is :class:`kdcli.reports.models.ExportReport` (its JSON Schema is
``ExportReport.model_json_schema()``); this module only renders it. Numbers are written by
:mod:`kdcli.reports.format`, shared with the other reports.
"""

from __future__ import annotations

from pathlib import Path

from kdcli.files import atomic_write_json, atomic_write_text
from kdcli.reports.charts import html_page, html_table, line_chart
from kdcli.reports.format import DASH, count, mb, ms, pct, per_second, ratio, sci
from kdcli.reports.models import ExportReport, LatencyStats

# ------------------------------------------------------------------------------------- helpers


def _stats(table: dict, model: str, bs: int) -> LatencyStats | None:
    return table.get(model, {}).get(str(bs))


def _resource_rows(report: ExportReport) -> list[list[str]]:
    """Rows of (metric, teacher, student, student/teacher) shared by all renderings."""
    s, t, r, acc = report.student, report.teacher, report.ratios, report.accuracy
    rows = [["parameters", count(t and t.params), count(s.params), ratio(r and r.params)],
            ["MACs", count(t and t.macs), count(s.macs), ratio(r and r.macs)],
            ["ONNX size", mb(t and t.size_bytes), mb(s.size_bytes), ratio(r and r.size)]]
    if acc:
        drop = acc.drop_pt
        rows.append(["accuracy (ONNX)", pct(acc.teacher_onnx), pct(acc.student_onnx),
                     DASH if drop is None else f"{drop:+.2f} pt drop"])
        rows.append(["accuracy (PyTorch)", pct(acc.teacher_pytorch), pct(acc.student_pytorch), ""])
    return rows


def _latency_rows(report: ExportReport, provider: str) -> list[list[str]]:
    lat = report.latency
    table = lat.onnxruntime.get(provider, {})
    rows = []
    for bs in lat.batch_sizes:
        s, t = _stats(table, "student", bs), _stats(table, "teacher", bs)
        sp = lat.speedup.get(provider, {}).get(str(bs))
        rows.append([str(bs), ms(t and t.median_ms), ms(s and s.median_ms),
                     DASH if not s else f"{ms(s.p90_ms)} / {ms(s.p99_ms)}",
                     per_second(s and s.throughput), ratio(sp)])
    return rows


_LAT_HEAD = ["batch", "teacher median ms", "student median ms", "student p90 / p99 ms", "student samples/s", "speed-up"]


def _threads(report: ExportReport, provider: str) -> str:
    for model in report.latency.onnxruntime.get(provider, {}).values():
        for stats in model.values():
            return str(stats.threads)
    return "?"


def _verification_rows(report: ExportReport, opset_as_text: bool) -> list[list]:
    rows = []
    for role, m in (("teacher", report.teacher), ("student", report.student)):
        if m:
            v = m.verification
            rows.append([role, m.file, m.exporter, str(m.opset) if opset_as_text else m.opset, sci(v.max_abs_diff),
                         pct(v.top1_agreement), f"{v.samples} ({v.inputs})"])
    return rows


_VER_HEAD = ["model", "file", "exporter", "opset", "max abs diff", "top-1 agreement", "samples"]


def _environment(report: ExportReport) -> str:
    return ", ".join(f"{k} {v}" for k, v in report.environment.items())


# ------------------------------------------------------------------------------------ markdown

def render_markdown(report: ExportReport) -> str:
    """``report.md``: GitHub-flavoured Markdown to paste into a PR or a CI job summary."""
    def table(head, rows):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])

    lat = report.latency
    out = [f"# kdcli export report: {report.student.name}", ""]
    out += [table(["", "teacher", "student", "ratio"], _resource_rows(report)), ""]
    if report.accuracy:
        out += [f"Accuracy on {report.accuracy.samples:,} evaluation samples.", ""]
    for provider in lat.onnxruntime:
        out += [f"## Latency: onnxruntime {provider} ({_threads(report, provider)} threads)", "",
                table(_LAT_HEAD, _latency_rows(report, provider)), ""]
    if lat.pytorch:
        out += ["## Latency: PyTorch eager (reference)", ""]
        rows = [[str(bs)] + [ms(st.median_ms) if (st := _stats(lat.pytorch, m, bs)) else DASH
                             for m in ("teacher", "student")] for bs in lat.batch_sizes]
        out += [table(["batch", "teacher median ms", "student median ms"], rows), ""]
    out += ["## Verification (ONNX vs PyTorch)", ""]
    out += [table(_VER_HEAD, _verification_rows(report, opset_as_text=True)), ""]
    gates = report.gates
    if gates.expressions:
        out += ["## Gates", ""]
        failed = "\n".join(f"- ❌ {f}" for f in gates.failures)
        out += [failed or f"- ✅ all {len(gates.expressions)} gates passed: " +
                ", ".join(f"`{g}`" for g in gates.expressions), ""]
    if report.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    out += [f"<sub>{_environment(report)} · {report.created}</sub>", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- html

def render_html(report: ExportReport) -> str:
    """``report.html``: self-contained (inline CSS and SVG charts, nothing loaded from the network)."""
    import html


    lat = report.latency
    provider = lat.primary_provider
    body = [html_table(["", "teacher", "student", "ratio"], _resource_rows(report))]
    series = {}
    for model in ("teacher", "student"):
        for prov, table in [(provider, lat.onnxruntime.get(provider, {})), ("PyTorch", lat.pytorch)]:
            pts = [(float(bs), st.median_ms) for bs in lat.batch_sizes if (st := _stats(table, model, bs))]
            if pts:
                series[f"{model} ({prov.replace('ExecutionProvider', '')})"] = pts
    charts = [line_chart(series, title="Median latency by batch size", x_label="batch size",
                         y_label="median latency (ms)", log_x=len(lat.batch_sizes) > 1)]
    acc = report.accuracy
    if acc:
        pts = {"student": [(float(report.student.macs), 100 * acc.student_onnx)]}
        if report.teacher and acc.teacher_onnx is not None:
            pts = {"teacher": [(float(report.teacher.macs), 100 * acc.teacher_onnx)], **pts}
        charts.append(line_chart(pts, title="Accuracy against size", x_label="MACs", y_label="accuracy (%)", y_max=100.0))
    body.append('<div class="charts">' + "".join(charts) + "</div>")
    for prov in lat.onnxruntime:
        body.append(f"<h2>Latency: onnxruntime {html.escape(prov)} ({_threads(report, prov)} threads)</h2>")
        body.append(html_table(_LAT_HEAD, _latency_rows(report, prov)))
    body.append("<h2>Verification (ONNX vs PyTorch)</h2>")
    body.append(html_table(_VER_HEAD, _verification_rows(report, opset_as_text=False)))
    gates = report.gates
    if gates.expressions:
        body.append("<h2>Gates</h2><ul>")
        body += [f'<li class="fail">{html.escape(f)}</li>' for f in gates.failures]
        if not gates.failures:
            body.append(f'<li class="ok">all passed: {html.escape(", ".join(gates.expressions))}</li>')
        body.append("</ul>")
    if report.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    body.append(f"<p><small>{html.escape(_environment(report))} · {html.escape(report.created)}</small></p>")
    return html_page(f"kdcli export report: {report.student.name}", "\n".join(body))


# -------------------------------------------------------------------------------------- terminal

def summary_table(report: ExportReport):
    """A rich Table for the terminal: resources, accuracy and latency, teacher next to student."""
    from rich.table import Table

    table = Table(title=f"export: {report.student.name}", show_lines=False)
    for col, justify in (("", "left"), ("teacher", "right"), ("student", "right"), ("ratio", "right")):
        table.add_column(col, justify=justify)
    for row in _resource_rows(report):
        table.add_row(*row)
    provider = report.latency.primary_provider
    for row in _latency_rows(report, provider):
        table.add_row(f"latency @{row[0]} (ms, {provider.replace('ExecutionProvider', '')})", row[1], row[2], row[5])
    return table


def write_reports(report: ExportReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.html`` atomically. The JSON is validated
    again first (a model can be changed after it was built): what is written always reads back."""
    out_dir = Path(out_dir)
    data = report.to_json()
    ExportReport.model_validate(data)  # a ValidationError here is a bug in kdcli, not user input
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    atomic_write_json(paths["json"], data)
    atomic_write_text(paths["md"], render_markdown(report))
    atomic_write_text(paths["html"], render_html(report))
    return paths
