"""The export report: one versioned JSON data model, rendered as JSON, Markdown, HTML and a rich table.

``report.json`` follows :data:`REPORT_SCHEMA` (a JSON Schema, checked by :func:`validate` — a small
validator for the subset used here: ``type``, ``required``, ``properties``, ``items``,
``additionalProperties``). Conventions: accuracies are fractions in [0, 1]; ratios are
student / teacher; speed-ups are teacher / student median latency; latency tables are keyed
``provider → model → batch size (string) → stats``.
"""

from __future__ import annotations

from pathlib import Path

from kdcli.files import atomic_write_json, atomic_write_text

REPORT_VERSION = 1

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_STATS = {"type": "object", "required": ["median_ms", "p90_ms", "p99_ms", "throughput", "runs", "provider", "threads"],
          "properties": {"median_ms": _NUM, "p90_ms": _NUM, "p99_ms": _NUM, "mean_ms": _NUM, "min_ms": _NUM,
                         "throughput": _NUM, "runs": {"type": "integer"}, "provider": {"type": "string"},
                         "threads": {"type": "integer"}}}
_BY_MODEL = {"type": "object", "additionalProperties": {"type": "object", "additionalProperties": _STATS}}
_MODEL = {
    "type": "object",
    "required": ["name", "file", "size_bytes", "exporter", "opset", "params", "macs", "verification"],
    "properties": {
        "name": {"type": "string"}, "file": {"type": "string"}, "size_bytes": {"type": "integer"},
        "exporter": {"type": "string"}, "opset": {"type": "integer"}, "external_data": {"type": "boolean"},
        "export_notes": {"type": "array", "items": {"type": "string"}},
        "params": {"type": "integer"}, "macs": {"type": "integer"},
        "verification": {"type": "object", "required": ["max_abs_diff", "top1_agreement", "samples", "inputs"],
                         "properties": {"max_abs_diff": _NUM, "top1_agreement": _NUM, "top1_ties": {"type": "integer"},
                                        "samples": {"type": "integer"}, "inputs": {"type": "string"}, "atol": _NUM}},
    },
}

REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "kdcli export report",
    "type": "object",
    "required": ["schema", "version", "created", "environment", "student", "teacher", "ratios", "accuracy",
                 "latency", "gates", "notes"],
    "properties": {
        "schema": {"type": "string"},            # always "kdcli/export-report"
        "version": {"type": "integer"},          # REPORT_VERSION; bumped on incompatible changes
        "created": {"type": "string"},           # ISO 8601, UTC
        "environment": {"type": "object", "additionalProperties": {"type": ["string", "integer"]}},
        "student": _MODEL,
        "teacher": {**_MODEL, "type": ["object", "null"]},
        "ratios": {"type": ["object", "null"], "required": ["size", "macs", "params"],
                   "properties": {"size": _NUM, "macs": _NUM, "params": _NUM}},
        "accuracy": {"type": ["object", "null"], "required": ["samples", "student_onnx", "student_pytorch", "teacher_onnx"],
                     "properties": {"samples": {"type": "integer"}, "student_onnx": _NUM, "student_pytorch": _NUM,
                                    "teacher_onnx": _NUM_OR_NULL, "teacher_pytorch": _NUM_OR_NULL,
                                    "drop_pt": _NUM_OR_NULL}},
        "latency": {"type": "object",
                    "required": ["batch_sizes", "time_budget_s", "primary_provider", "onnxruntime", "pytorch", "speedup"],
                    "properties": {"batch_sizes": {"type": "array", "items": {"type": "integer"}},
                                   "time_budget_s": _NUM, "primary_provider": {"type": "string"},
                                   "onnxruntime": {"type": "object", "additionalProperties": _BY_MODEL},
                                   "pytorch": _BY_MODEL,
                                   "speedup": {"type": "object", "additionalProperties":
                                               {"type": "object", "additionalProperties": _NUM}}}},
        "gates": {"type": "object", "required": ["expressions", "failures"],
                  "properties": {"expressions": {"type": "array", "items": {"type": "string"}},
                                 "failures": {"type": "array", "items": {"type": "string"}}}},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value, type_name: str) -> bool:
    if type_name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[type_name])


def validate(obj, schema: dict, where: str = "$") -> list[str]:
    """Errors of ``obj`` against ``schema`` (subset: type, required, properties, items,
    additionalProperties), each as ``"<json path>: <what was expected>"``; empty when valid."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_is(obj, t) for t in types):
            return [f"{where}: expected {' or '.join(types)}, got {type(obj).__name__}"]
    errors: list[str] = []
    if isinstance(obj, dict):
        errors += [f"{where}: missing required field {k!r}" for k in schema.get("required", []) if k not in obj]
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if key in props:
                errors += validate(value, props[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, f"{where}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, value in enumerate(obj):
            errors += validate(value, schema["items"], f"{where}[{i}]")
    return errors


def validate_report(report: dict) -> None:
    """Raise ValueError listing the first schema violations of ``report`` (a bug in kdcli, not user input)."""
    errors = validate(report, REPORT_SCHEMA)
    if errors:
        raise ValueError("export report does not match REPORT_SCHEMA: " + "; ".join(errors[:5]))


# ------------------------------------------------------------------------------------- helpers

def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _mb(n) -> str:
    return "–" if n is None else f"{n / 1e6:.2f} MB"


def _count(n) -> str:
    if n is None:
        return "–"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{suf}"
    return str(n)


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.3f}×"


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _resource_rows(report: dict) -> list[list[str]]:
    """Rows of (metric, teacher, student, student/teacher) shared by all renderings."""
    s, t, r, acc = report["student"], report.get("teacher") or {}, report.get("ratios") or {}, report.get("accuracy") or {}
    rows = [["parameters", _count(t.get("params")), _count(s["params"]), _ratio(r.get("params"))],
            ["MACs", _count(t.get("macs")), _count(s["macs"]), _ratio(r.get("macs"))],
            ["ONNX size", _mb(t.get("size_bytes")), _mb(s["size_bytes"]), _ratio(r.get("size"))]]
    if acc:
        drop = acc.get("drop_pt")
        rows.append(["accuracy (ONNX)", _pct(acc.get("teacher_onnx")), _pct(acc.get("student_onnx")),
                     "–" if drop is None else f"{drop:+.2f} pt drop"])
        rows.append(["accuracy (PyTorch)", _pct(acc.get("teacher_pytorch")), _pct(acc.get("student_pytorch")), ""])
    return rows


def _latency_rows(report: dict, provider: str) -> list[list[str]]:
    lat = report["latency"]
    table = lat["onnxruntime"].get(provider, {})
    rows = []
    for bs in lat["batch_sizes"]:
        s = _get(table, "student", str(bs)) or {}
        t = _get(table, "teacher", str(bs)) or {}
        sp = _get(lat, "speedup", provider, str(bs))
        rows.append([str(bs), "–" if not t else f"{t['median_ms']:.3f}", "–" if not s else f"{s['median_ms']:.3f}",
                     "–" if not s else f"{s['p90_ms']:.3f} / {s['p99_ms']:.3f}",
                     "–" if not s else f"{s['throughput']:,.0f}", _ratio(sp)])
    return rows


_LAT_HEAD = ["batch", "teacher median ms", "student median ms", "student p90 / p99 ms", "student samples/s", "speed-up"]


def _threads(report: dict, provider: str) -> str:
    for model in report["latency"]["onnxruntime"].get(provider, {}).values():
        for stats in model.values():
            return str(stats["threads"])
    return "?"


# ------------------------------------------------------------------------------------ markdown

def render_markdown(report: dict) -> str:
    """``report.md``: GitHub-flavoured Markdown to paste into a PR or a CI job summary."""
    def table(head, rows):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])

    s, t = report["student"], report.get("teacher")
    out = [f"# kdcli export report: {s['name']}", ""]
    out += [table(["", "teacher", "student", "ratio"], _resource_rows(report)), ""]
    if report.get("accuracy"):
        out += [f"Accuracy on {report['accuracy']['samples']:,} evaluation samples.", ""]
    for provider in report["latency"]["onnxruntime"]:
        out += [f"## Latency: onnxruntime {provider} ({_threads(report, provider)} threads)", "",
                table(_LAT_HEAD, _latency_rows(report, provider)), ""]
    eager = report["latency"]["pytorch"]
    if eager:
        out += ["## Latency: PyTorch eager (reference)", ""]
        rows = [[str(bs)] + [f"{_get(eager, m, str(bs), 'median_ms'):.3f}" if _get(eager, m, str(bs)) else "–"
                             for m in ("teacher", "student")] for bs in report["latency"]["batch_sizes"]]
        out += [table(["batch", "teacher median ms", "student median ms"], rows), ""]
    out += ["## Verification (ONNX vs PyTorch)", ""]
    vrows = [[role, m["file"], m["exporter"], str(m["opset"]), f"{m['verification']['max_abs_diff']:.2e}",
              _pct(m["verification"]["top1_agreement"]), f"{m['verification']['samples']} ({m['verification']['inputs']})"]
             for role, m in (("teacher", t), ("student", s)) if m]
    out += [table(["model", "file", "exporter", "opset", "max abs diff", "top-1 agreement", "samples"], vrows), ""]
    gates = report["gates"]
    if gates["expressions"]:
        out += ["## Gates", ""]
        failed = "\n".join(f"- ❌ {f}" for f in gates["failures"])
        out += [failed or f"- ✅ all {len(gates['expressions'])} gates passed: " +
                ", ".join(f"`{g}`" for g in gates["expressions"]), ""]
    if report["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    env = report["environment"]
    out += ["<sub>" + ", ".join(f"{k} {v}" for k, v in env.items()) + f" · {report['created']}</sub>", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- html

def render_html(report: dict) -> str:
    """``report.html``: self-contained (inline CSS and SVG charts, nothing loaded from the network)."""
    import html

    from kdcli.reports.charts import html_page, html_table, line_chart

    lat = report["latency"]
    provider = lat["primary_provider"]
    body = [html_table(["", "teacher", "student", "ratio"], _resource_rows(report))]
    series = {}
    for model in ("teacher", "student"):
        for prov, table in [(provider, lat["onnxruntime"].get(provider, {})), ("PyTorch", lat["pytorch"])]:
            pts = [(float(bs), table[model][str(bs)]["median_ms"]) for bs in lat["batch_sizes"]
                   if _get(table, model, str(bs))]
            if pts:
                series[f"{model} ({prov.replace('ExecutionProvider', '')})"] = pts
    charts = [line_chart(series, title="Median latency by batch size", x_label="batch size",
                         y_label="median latency (ms)", log_x=len(lat["batch_sizes"]) > 1)]
    acc = report.get("accuracy")
    if acc:
        pts = {"student": [(float(report["student"]["macs"]), 100 * acc["student_onnx"])]}
        if report.get("teacher") and acc.get("teacher_onnx") is not None:
            pts = {"teacher": [(float(report["teacher"]["macs"]), 100 * acc["teacher_onnx"])], **pts}
        charts.append(line_chart(pts, title="Accuracy against size", x_label="MACs", y_label="accuracy (%)", y_max=100.0))
    body.append('<div class="charts">' + "".join(charts) + "</div>")
    for prov in lat["onnxruntime"]:
        body.append(f"<h2>Latency: onnxruntime {html.escape(prov)} ({_threads(report, prov)} threads)</h2>")
        body.append(html_table(_LAT_HEAD, _latency_rows(report, prov)))
    body.append("<h2>Verification (ONNX vs PyTorch)</h2>")
    rows = [[role, m["file"], m["exporter"], m["opset"], f"{m['verification']['max_abs_diff']:.2e}",
             _pct(m["verification"]["top1_agreement"]), f"{m['verification']['samples']} ({m['verification']['inputs']})"]
            for role, m in (("teacher", report.get("teacher")), ("student", report["student"])) if m]
    body.append(html_table(["model", "file", "exporter", "opset", "max abs diff", "top-1 agreement", "samples"], rows))
    gates = report["gates"]
    if gates["expressions"]:
        body.append("<h2>Gates</h2><ul>")
        body += [f'<li class="fail">{html.escape(f)}</li>' for f in gates["failures"]]
        if not gates["failures"]:
            body.append(f'<li class="ok">all passed: {html.escape(", ".join(gates["expressions"]))}</li>')
        body.append("</ul>")
    if report["notes"]:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"]) + "</ul>")
    env = ", ".join(f"{k} {v}" for k, v in report["environment"].items())
    body.append(f"<p><small>{html.escape(env)} · {html.escape(report['created'])}</small></p>")
    return html_page(f"kdcli export report: {report['student']['name']}", "\n".join(body))


# -------------------------------------------------------------------------------------- terminal

def summary_table(report: dict):
    """A rich Table for the terminal: resources, accuracy and latency, teacher next to student."""
    from rich.table import Table

    table = Table(title=f"export: {report['student']['name']}", show_lines=False)
    for col, justify in (("", "left"), ("teacher", "right"), ("student", "right"), ("ratio", "right")):
        table.add_column(col, justify=justify)
    for row in _resource_rows(report):
        table.add_row(*row)
    lat = report["latency"]
    provider = lat["primary_provider"]
    for row in _latency_rows(report, provider):
        table.add_row(f"latency @{row[0]} (ms, {provider.replace('ExecutionProvider', '')})", row[1], row[2], row[5])
    return table


def write_reports(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Validate ``report`` and write ``report.json``, ``report.md`` and ``report.html`` atomically."""
    out_dir = Path(out_dir)
    validate_report(report)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], render_markdown(report))
    atomic_write_text(paths["html"], render_html(report))
    return paths
