"""The report of a ``kdcli compress`` run: JSON, Markdown and HTML from one data model.

``compress_report.json`` is the :class:`kdcli.dkdp.compress.CompressResult` as JSON after ``$schema``
and ``schema_version`` (its typed model: :class:`kdcli.reports.compress_model.CompressReport`); the Markdown and HTML renderings show the teacher against the student and every DKDP
step (τ, MACs, accuracy, the reason τ moved), with a chart of accuracy against MACs and, when
the recipe has a VID term, its layer weights λ as a heatmap.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from kdcli.files import atomic_write_json, atomic_write_text
from kdcli.reports.charts import heatmap, html_page, html_table, line_chart
from kdcli.reports.export import block_warning
from kdcli.reports.compress_model import SCHEMA_URI, SCHEMA_VERSION, check_compress_report
from kdcli.reports.format import binary_size, integer, ms, pct, ratio

__all__ = ["SCHEMA_URI", "SCHEMA_VERSION", "render_html", "render_markdown", "summary_rows", "summary_table",
           "write_compress_report"]


def _export_side(result, role: str) -> dict:
    """ONNX file size, accuracy and onnxruntime latencies of ``role`` (teacher/student) from the
    export report (:mod:`kdcli.reports.export` schema), or {} when nothing was exported."""
    exp = result.export or {}
    if role not in exp:
        return {}
    lat = exp.get("latency") or {}
    by_provider = (lat.get("onnxruntime") or {}).get(lat.get("primary_provider"), {})
    return {"onnx_bytes": exp[role].get("size_bytes"),
            "onnx_accuracy": (exp.get("accuracy") or {}).get(f"{role}_onnx"),
            "latency": by_provider.get(role) or {}}


def _latency_text(side: dict) -> str:
    lat = side.get("latency") or {}
    parts = [f"{ms(v['median_ms'], unit=True)} @{bs}" for bs, v in sorted(lat.items(), key=lambda kv: int(kv[0]))
             if isinstance(v, dict) and "median_ms" in v]
    return ", ".join(parts) or "–"


def speedups(result) -> dict[int, float]:
    """Teacher / student median onnxruntime latency per batch size (the export report's primary
    provider); {} without an export."""
    lat = (result.export or {}).get("latency") or {}
    table = (lat.get("speedup") or {}).get(lat.get("primary_provider"), {})
    return {int(bs): float(v) for bs, v in sorted(table.items(), key=lambda kv: int(kv[0]))}


def primary_latency(export: dict | None) -> dict:
    """``{model: {bs (str): stats}}``: the export report's onnxruntime latencies on its primary
    provider; {} without them."""
    lat = (export or {}).get("latency") or {}
    return (lat.get("onnxruntime") or {}).get(lat.get("primary_provider"), {}) or {}


def measured_speedups(export: dict | None) -> dict[int, tuple[float, float | None]]:
    """``{bs: (teacher / student median latency, its spread)}`` on the primary provider; the
    spread ``(T/S)·√((s_T/T)² + (s_S/S)²)`` with s half the interquartile range of a model's timed
    runs (both models' noise, for the slower-than-teacher check of :mod:`kdcli.dkdp.target`), None
    without recorded quartiles."""
    tab = primary_latency(export)
    out = {}
    for bs, s in sorted((tab.get("student") or {}).items(), key=lambda kv: int(kv[0])):
        t = (tab.get("teacher") or {}).get(bs)
        if not isinstance(t, dict) or not isinstance(s, dict) or not t.get("median_ms") or not s.get("median_ms"):
            continue
        tm, sm = float(t["median_ms"]), float(s["median_ms"])
        spread = None
        if all(isinstance(d.get(k), (int, float)) for d in (t, s) for k in ("p25_ms", "p75_ms")):
            st, ss = (t["p75_ms"] - t["p25_ms"]) / 2, (s["p75_ms"] - s["p25_ms"]) / 2
            spread = (tm / sm) * math.hypot(st / tm, ss / sm)
        out[int(bs)] = (tm / sm, spread)
    return out


def slower_warning(result) -> str | None:
    """A line naming the batch sizes at which the student ran slower than its teacher, or None."""
    slow = {bs: v for bs, v in speedups(result).items() if v < 1.0}
    if not slow:
        return None
    return ("the student is SLOWER than the teacher in onnxruntime at batch " +
            ", ".join(f"{bs} ({ratio(v, 2)})" for bs, v in slow.items()) +
            " despite its MACs ratio; keep hardware-friendly widths (prune.round_to 8, the default, or 16) "
            "and aim at speed (target.speedup)")


def _block_warning(result) -> str | None:
    """:func:`kdcli.reports.export.block_warning` of the run's export report, or None."""
    return block_warning(((result.export or {}).get("latency") or {}).get("channel_block"))


def summary_rows(result) -> list[tuple[str, str, str]]:
    """(what, teacher, student) rows of the summary shown in the terminal and the reports."""
    t, s = result.teacher, result.student
    te, se = _export_side(result, "teacher"), _export_side(result, "student")
    rows = [("model", str(t.get("model", "")), f"{s.get('model', 'student')} ({s.get('from') or 'as declared'})"),
            ("val accuracy", pct(t.get("val_accuracy")), pct(s.get("val_accuracy")))]
    if "test_accuracy" in t or "test_accuracy" in s:
        rows.append(("test accuracy", pct(t.get("test_accuracy")), pct(s.get("test_accuracy"))))
    if te.get("onnx_accuracy") is not None or se.get("onnx_accuracy") is not None:
        rows.append(("ONNX accuracy", pct(te.get("onnx_accuracy")), pct(se.get("onnx_accuracy"))))
    rows += [("parameters", integer(t.get("params")), f"{integer(s.get('params'))} ({ratio(s.get('params_ratio', 0))})"),
             ("MACs", integer(t.get("macs")), f"{integer(s.get('macs'))} ({ratio(s.get('macs_ratio', 0))})")]
    if te or se:
        rows.append(("ONNX file", binary_size(te.get("onnx_bytes")), binary_size(se.get("onnx_bytes"))))
        rows.append(("latency (onnxruntime)", _latency_text(te), _latency_text(se)))
    sp = speedups(result)
    if sp:
        rows.append(("speed-up (teacher / student)", ratio(1.0, 2),
                     ", ".join(f"{ratio(v, 2)} @{bs}" for bs, v in sp.items())
                     + f" (MACs {ratio(s.get('macs_ratio', 0))})"))
    return rows


def data_lines(result) -> list[str]:
    """Which data judged what, the normalisation, and the warnings about them (one line each)."""
    d = getattr(result, "data", None) or {}
    lines = [f"{name}: {d['splits'][name]}" for name in ("val", "test", "train") if name in d.get("splits", {})]
    if d.get("normalization"):
        lines.append(f"normalisation: {d['normalization']}")
    lines += [f"warning: {w}" for w in d.get("warnings", [])]
    slow = slower_warning(result)
    if slow:
        lines.append(f"warning: {slow}")
    block = _block_warning(result)
    if block:
        lines.append(f"warning: {block}")
    forced = [r for r in result.steps if r.get("forced")]
    lines += [f"warning: step {r['step']}: {r['forced']}" for r in forced]
    return lines


def summary_table(result):
    """A rich Table of teacher against student, then the verdict."""
    from rich.table import Table
    from rich.text import Text

    # Text, not markup: model specs and gate messages are the user's strings ("m[v2].py", "[/ms]")
    verdict = "target met" if result.target_met and not result.gate_failures else "; ".join(result.gate_failures)
    warnings = [w for w in (slower_warning(result), _block_warning(result)) if w]
    table = Table(title="kdcli compress", caption=Text("\n".join([verdict] + [f"warning: {w}" for w in warnings])))
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    for row in summary_rows(result):
        table.add_row(*(Text(str(c)) for c in row))
    return table


def _timed(result) -> bool:
    """Whether the steps were timed (a latency or speed-up target): then the table shows latency."""
    return any(r.get("latency_ms") is not None for r in result.steps)


def _latency_cell(r: dict) -> str:
    """The step's measured latency, with its aim and the lookup table's prediction when it aimed at one."""
    ms = r.get("latency_ms")
    if ms is None:
        return "–"
    aim, pred = r.get("latency_aim_ms"), r.get("predicted_latency_ms")
    return f"{ms:.3g}" + (f" (aim {aim:.3g}, predicted {pred:.3g})" if aim is not None and pred is not None else "")


def _step_headers(result) -> list[str]:
    return _STEP_HEADERS[:4] + (["latency ms"] if _timed(result) else []) + _STEP_HEADERS[4:]


def _steps_rows(result) -> list[list[str]]:
    rows, timed = [], _timed(result)
    for r in result.steps:
        tau = r.get("tau")
        rows.append([str(r["step"]), str(r["attempt"]), "–" if tau is None else f"{tau:.4f}",
                     f"{r['macs_ratio']:.3f}", *([_latency_cell(r)] if timed else []), integer(r["params"]),
                     pct(r["val_accuracy"]) if r["val_accuracy"] == r["val_accuracy"] else "–",  # NaN: diverged
                     f"{100 * r['accuracy_drop']:.2f}" if r["accuracy_drop"] == r["accuracy_drop"] else "–",
                     ("yes (forced)" if r.get("forced") else "yes") if r["accepted"] else "no",
                     r["reason"] + (f" — {r['forced']}" if r.get("forced") else "")])
    return rows


_STEP_HEADERS = ["step", "attempt", "τ", "MACs ratio", "params", "val acc", "drop (pt)", "kept", "why τ moved"]


def render_markdown(result) -> str:
    """The report as Markdown (for a pull request or a CI job summary)."""
    out = ["# kdcli compress report", "",
           f"**{'Target met' if result.target_met and not result.gate_failures else 'Target not met'}**"
           + ("" if not result.gate_failures else ": " + "; ".join(result.gate_failures)), "",
           "| | teacher | student |", "|---|---:|---:|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(result)]
    if data_lines(result):
        out += ["", "## Data", ""] + [f"- {line}" for line in data_lines(result)]
    if result.steps:
        headers = _step_headers(result)
        out += ["", "## DKDP steps", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in _steps_rows(result)]
    lam = result.vid_lambda
    if lam:
        out += ["", f"## VID layer weights λ ({_lambda_kind(lam)})", "",
                "Rows: teacher layers; columns: student layers; each column sums to 1.", "",
                "| teacher \\ student | " + " | ".join(f"`{s}`" for s in lam["student_layers"]) + " |",
                "|---|" + "---:|" * len(lam["student_layers"])]
        out += [f"| `{t}` | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                for t, row in zip(lam["teacher_layers"], lam["matrix"])]
    return "\n".join(out) + "\n"


def _lambda_kind(lam: dict) -> str:
    return "learned" if lam.get("learned") else "fixed"


def render_html(result) -> str:
    """The report as one self-contained HTML page with the accuracy-against-MACs chart."""

    t = result.teacher
    teacher_pt = [(1.0, 100 * t["val_accuracy"])]
    kept = [(r["macs_ratio"], 100 * r["val_accuracy"]) for r in result.steps
            if r["accepted"] and r["val_accuracy"] == r["val_accuracy"]]
    undone = [(r["macs_ratio"], 100 * r["val_accuracy"]) for r in result.steps
              if not r["accepted"] and r["val_accuracy"] == r["val_accuracy"]]
    series = {"teacher": teacher_pt}
    if kept:  # a declared student has no steps: its point alone, not one on the teacher's
        series["student (kept steps)"] = [(1.0, 100 * t["val_accuracy"])] + kept
    if undone:
        series["undone steps"] = undone
    s = result.student
    series["final student"] = [(s["macs_ratio"], 100 * s["val_accuracy"])]
    chart = line_chart(series, title="Validation accuracy against MACs (fraction of the teacher's)",
                       x_label="MACs / teacher MACs", y_label="val accuracy (%)", y_max=100.0)
    verdict = "Target met" if result.target_met and not result.gate_failures else \
        "Not met: " + "; ".join(result.gate_failures)
    body = [f"<p><strong>{html.escape(verdict)}</strong></p>",
            html_table(["", "teacher", "student"], [list(r) for r in summary_rows(result)]), chart]
    if data_lines(result):
        body += ["<h2>Data</h2>", "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in data_lines(result)) + "</ul>"]
    if result.steps:
        body += ["<h2>DKDP steps</h2>", html_table(_step_headers(result), _steps_rows(result))]
    lam = result.vid_lambda
    if lam:
        body += [f"<h2>VID layer weights λ ({_lambda_kind(lam)})</h2>",
                 "<p>How much each student layer (column) learns from each teacher layer (row) in the "
                 "distillation that made this student; each column sums to 1.</p>",
                 heatmap(lam["matrix"], lam["teacher_layers"], lam["student_layers"], title="λ (teacher × student)",
                         value_range=(0.0, 1.0))]
    return html_page("kdcli compress report", "\n".join(body))


def write_compress_report(result, run_dir: Path) -> None:
    """Write ``compress_report.json``, ``.md`` and ``.html`` into ``run_dir`` atomically; the JSON
    is validated through :class:`kdcli.reports.compress_model.CompressReport` first
    (ReportShapeError naming the field, and nothing written, when it does not match)."""
    run_dir = Path(run_dir)
    report = check_compress_report({"$schema": SCHEMA_URI, "schema_version": SCHEMA_VERSION, **result.to_json()})
    atomic_write_json(run_dir / "compress_report.json", report.to_json())
    atomic_write_text(run_dir / "compress_report.md", render_markdown(result))
    atomic_write_text(run_dir / "compress_report.html", render_html(result))
