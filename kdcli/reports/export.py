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

INT8 = "student_int8"  # its name in the latency tables

# ------------------------------------------------------------------------------------- helpers


def _stats(table: dict, model: str, bs: int) -> LatencyStats | None:
    return table.get(model, {}).get(str(bs))


def _resource_head(report: ExportReport) -> list[str]:
    return ["", "teacher", "student", *(["student int8"] if report.student_int8 else []), "ratio"]


def _resource_rows(report: ExportReport) -> list[list[str]]:
    """Rows of (metric, teacher, student[, student int8], student/teacher) shared by all renderings."""
    s, t, r, acc, q = report.student, report.teacher, report.ratios, report.accuracy, report.student_int8

    def row(name, teacher, student, int8, rat):
        return [name, teacher, student, *([int8] if q else []), rat]

    rows = [row("parameters", count(t and t.params), count(s.params), DASH, ratio(r and r.params)),
            row("MACs", count(t and t.macs), count(s.macs), DASH, ratio(r and r.macs)),
            row("ONNX size", mb(t and t.size_bytes), mb(s.size_bytes), mb(q and q.size_bytes), ratio(r and r.size))]
    if acc:
        drop = acc.drop_pt
        rows.append(row("accuracy (ONNX)", pct(acc.teacher_onnx), pct(acc.student_onnx), pct(q and q.accuracy),
                        DASH if drop is None else f"{drop:+.2f} pt drop"))
        rows.append(row("accuracy (PyTorch)", pct(acc.teacher_pytorch), pct(acc.student_pytorch), DASH, ""))
    return rows


def _has_int8(report: ExportReport, provider: str) -> bool:
    return report.student_int8 is not None and INT8 in report.latency.onnxruntime.get(provider, {})


def _int8_speedups(report: ExportReport, provider: str, bs: int) -> str:
    """"teacher / int8 · fp32 student / int8" speed-ups of the int8 student at ``bs``."""
    q = report.student_int8
    vs_t = q.speedup.get(provider, {}).get(str(bs))
    vs_s = q.speedup_vs_student.get(provider, {}).get(str(bs))
    return f"{ratio(vs_t)} / {ratio(vs_s)}"


def _latency_head(report: ExportReport, provider: str) -> list[str]:
    q = _has_int8(report, provider)
    return ["batch", "teacher median ms", "student median ms", *(["int8 median ms"] if q else []),
            "student p90 / p99 ms", "student samples/s", "speed-up",
            *(["int8 speed-up (vs teacher / vs student)"] if q else [])]


def _latency_rows(report: ExportReport, provider: str) -> list[list[str]]:
    lat = report.latency
    table = lat.onnxruntime.get(provider, {})
    q = _has_int8(report, provider)
    rows = []
    for bs in lat.batch_sizes:
        s, t, i8 = _stats(table, "student", bs), _stats(table, "teacher", bs), _stats(table, INT8, bs)
        sp = lat.speedup.get(provider, {}).get(str(bs))
        rows.append([str(bs), ms(t and t.median_ms), ms(s and s.median_ms), *([ms(i8 and i8.median_ms)] if q else []),
                     DASH if not s else f"{ms(s.p90_ms)} / {ms(s.p99_ms)}",
                     per_second(s and s.throughput), ratio(sp), *([_int8_speedups(report, provider, bs)] if q else [])])
    return rows


def _threads(table: dict) -> str:
    """"N threads" of a latency table (model → batch size → stats), as measured."""
    counts = sorted({stats.threads for model in table.values() for stats in model.values()})
    return f"{'/'.join(str(c) for c in counts) or '?'} thread{'' if counts == [1] else 's'}"


def _verification_rows(report: ExportReport, opset_as_text: bool) -> list[list]:
    rows = []
    for role, m in (("teacher", report.teacher), ("student", report.student)):
        if m:
            v = m.verification
            rows.append([role, m.file, m.exporter, str(m.opset) if opset_as_text else m.opset, sci(v.max_abs_diff),
                         pct(v.top1_agreement), f"{v.samples} ({v.inputs})", _graph(m)])
    return rows


_VER_HEAD = ["model", "file", "exporter", "opset", "max abs diff", "top-1 agreement", "samples", "graph"]


def _graph(m) -> str:
    g = m.graph
    if g is None:
        return DASH
    done = [f"{n} {what}" for n, what in ((g.batchnorm_folded, "BatchNorm folded"), (g.identity_removed, "Identity removed"),
                                          (g.gelu_reordered, "GELU put in fusable order")) if n]
    return f"{g.nodes} nodes" + (f" ({', '.join(done)})" if done else "")


_INT8_HEAD = ["file", "size", "int8 ops", "accuracy (ONNX)", "top-1 agreement with fp32 student",
              "max abs diff vs fp32", "samples"]


def _int8_rows(report: ExportReport) -> list[list[str]]:
    q = report.student_int8
    return [[q.file, mb(q.size_bytes), str(q.quantized_nodes), pct(q.accuracy), pct(q.top1_agreement),
             sci(q.max_abs_diff), f"{q.samples} ({q.inputs})"]]


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
    out += [table(_resource_head(report), _resource_rows(report)), ""]
    if report.accuracy:
        out += [f"Accuracy on {report.accuracy.samples:,} evaluation samples.", ""]
    for provider in lat.onnxruntime:
        out += [f"## Latency: onnxruntime {provider} ({_threads(lat.onnxruntime[provider])})", "",
                table(_latency_head(report, provider), _latency_rows(report, provider)), ""]
    if lat.pytorch:
        out += [f"## Latency: PyTorch eager (reference, {_threads(lat.pytorch)})", ""]
        rows = [[str(bs)] + [ms(st.median_ms) if (st := _stats(lat.pytorch, m, bs)) else DASH
                             for m in ("teacher", "student")] for bs in lat.batch_sizes]
        out += [table(["batch", "teacher median ms", "student median ms"], rows), ""]
    out += ["## Verification (ONNX vs PyTorch)", ""]
    out += [table(_VER_HEAD, _verification_rows(report, opset_as_text=True)), ""]
    if report.student_int8:
        out += ["## int8 student (dynamic quantisation, onnxruntime)", "", table(_INT8_HEAD, _int8_rows(report)), ""]
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
    body = [html_table(_resource_head(report), _resource_rows(report))]
    series = {}
    for model in ("teacher", "student", INT8):
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
        body.append(f"<h2>Latency: onnxruntime {html.escape(prov)} ({_threads(lat.onnxruntime[prov])})</h2>")
        body.append(html_table(_latency_head(report, prov), _latency_rows(report, prov)))
    if lat.pytorch:
        body.append(f"<p>PyTorch eager reference: {_threads(lat.pytorch)}.</p>")
    body.append("<h2>Verification (ONNX vs PyTorch)</h2>")
    body.append(html_table(_VER_HEAD, _verification_rows(report, opset_as_text=False)))
    if report.student_int8:
        body.append("<h2>int8 student (dynamic quantisation, onnxruntime)</h2>")
        body.append(html_table(_INT8_HEAD, _int8_rows(report)))
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


def block_warning(block: dict | None) -> str | None:
    """One line when the student has more convolutions off the host's onnxruntime channel block
    than the teacher (``latency.channel_block`` of the export report, as a dict): they run
    unblocked, so the CPU speed-up trails the MACs ratio. None otherwise."""
    if not block or block["student_off"] <= (block.get("teacher_off") or 0):
        return None
    teacher = "" if block.get("teacher_off") is None else f"; the teacher: {block['teacher_off']}"
    return (f"student: {block['student_off']} of {block['convolutions']} convolutions have output widths that are "
            f"not a multiple of {block['channels']}, the channel block of onnxruntime's CPU convolutions on this "
            f"host ({block['isa']}{teacher}); they run unblocked, with reorders around them, so the CPU speed-up "
            f"trails the MACs ratio (prune.round_to: {block['channels']} keeps every width on the block, "
            "with fewer widths to choose from)")


# -------------------------------------------------------------------------------------- terminal

def summary_table(report: ExportReport):
    """A rich Table for the terminal: resources, accuracy and latency, teacher next to student (and
    the int8 student when there is one); the caption names the thread count."""
    from rich.table import Table

    provider = report.latency.primary_provider
    short = provider.replace("ExecutionProvider", "")
    table = Table(title=f"export: {report.student.name}", show_lines=False,
                  caption=f"onnxruntime {short}: {_threads(report.latency.table(provider))} (intra-op)")
    head = _resource_head(report)
    for col in head:
        table.add_column(col, justify="left" if not col else "right")
    for row in _resource_rows(report):
        table.add_row(*row)
    timed = _has_int8(report, provider)
    for row in _latency_rows(report, provider):
        int8 = [row[3] if timed else DASH] if report.student_int8 else []
        table.add_row(f"latency @{row[0]} (ms, {short})", row[1], row[2], *int8, row[6 if timed else 5])
    if timed:
        for bs in report.latency.batch_sizes:
            table.add_row(f"int8 speed-up @{bs} (vs teacher / student)", "", "", _int8_speedups(report, provider, bs), "")
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
