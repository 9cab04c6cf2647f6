"""``kdcli report diff A B``: two reports of the same kind side by side, changes marked.

Works on export reports (``report.json``), compress reports (``compress_report.json``, with their
export report when both runs exported) and analyses (``analysis.json``, the headline figures),
read and validated by :func:`kdcli.reports.models.load_any`. Each row is one figure: A, B, the
change Δ = B − A (and Δ % for latencies, sizes and counts) and whether B is *worse*: lower
accuracy, more latency, MACs, parameters or bytes, a lower speed-up, more failed gates. Latency
rows use the noise band of :mod:`kdcli.reports.gates`: B is worse (or better) only beyond
``1.5 · √(s_A² + s_B²)``, ``s`` half the interquartile range of the timed runs; inside it the row
is marked as noise. Reports without quartiles compare plainly. Absolute latencies are shown as
measured (no rescaling by the teacher's drift, which the teacher's own rows show): the speed-up
rows are the machine-independent comparison.

Rendered as a rich table (terminal), Markdown (a PR comment, a CI summary) or JSON. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel
from rich.table import Table
from rich.text import Text

from kdcli.errors import InputError
from kdcli.reports.format import DASH, count, mb, ratio
from kdcli.reports.gates import NOISE_K, half_iqr, speedup_spread
from kdcli.reports.models import load_any

Value = Union[float, int, str, bool, None]
Better = Optional[Literal["higher", "lower"]]
FORMATS = ("table", "markdown", "json")


@dataclass
class DiffRow:
    """One figure of both reports. ``unit``: ``%`` (accuracy in percent), ``pt`` (percentage
    points), ``ms``, ``x`` (a ratio or speed-up), ``count``, ``bytes``, ``s`` (seconds) or ``""``
    (text, or a plain number); ``better`` says which direction is an improvement (None: neither)."""

    section: str
    name: str
    a: Value
    b: Value
    unit: str = ""
    better: Better = None
    a_spread: Optional[float] = None  # half the IQR of a latency median (kdcli.reports.gates)
    b_spread: Optional[float] = None

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.a, self.b))

    @property
    def delta(self) -> Optional[float]:
        return float(self.b) - float(self.a) if self.numeric else None

    @property
    def pct(self) -> Optional[float]:
        """Δ in percent of A, for latencies, sizes and counts."""
        if not self.numeric or self.unit not in ("ms", "count", "bytes", "s") or not self.a:
            return None
        return 100.0 * self.delta / float(self.a)

    @property
    def band(self) -> Optional[float]:
        """The noise band of a latency row (None without both spreads)."""
        if self.a_spread is None or self.b_spread is None:
            return None
        return NOISE_K * math.hypot(self.a_spread, self.b_spread)

    @property
    def change(self) -> str:
        """``worse``, ``better``, ``noise`` (a latency change inside the noise band), ``changed``
        (text, or a figure without a better direction) or ``""`` (the same)."""
        if not self.numeric:
            if isinstance(self.a, bool) and isinstance(self.b, bool) and self.a != self.b and self.better:
                return "worse" if (self.b < self.a) == (self.better == "higher") else "better"
            return "changed" if self.a != self.b else ""
        a, b = float(self.a), float(self.b)
        if math.isnan(a) or math.isnan(b):
            return "" if math.isnan(a) and math.isnan(b) else "changed"
        if a == b:
            return ""
        if self.better is None:
            return "changed"
        band = self.band
        if band is not None and abs(b - a) <= band:
            return "noise"
        return "worse" if (b < a) == (self.better == "higher") else "better"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(delta=self.delta, pct=self.pct, noise_band=self.band, change=self.change)
        return out


@dataclass
class ReportDiff:
    kind: str            # export-report, compress-report or analysis
    a: str               # the files, as given
    b: str
    rows: list[DiffRow]

    @property
    def worse(self) -> list[DiffRow]:
        return [r for r in self.rows if r.change == "worse"]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "a": self.a, "b": self.b, "worse": len(self.worse),
                "rows": [r.to_json() for r in self.rows]}


# --------------------------------------------------------------------------------- the figures

def _pct(x: Optional[float]) -> Optional[float]:
    return None if x is None else 100.0 * x


def _export_rows(a, b, prefix: str = "") -> list[DiffRow]:
    rows: list[DiffRow] = []

    def add(section, name, va, vb, unit="", better=None, sa=None, sb=None):
        if va is None and vb is None:
            return
        rows.append(DiffRow(prefix + section, name, va, vb, unit, better, sa, sb))

    acc_a, acc_b = a.accuracy, b.accuracy
    add("accuracy (ONNX)", "student", _pct(acc_a and acc_a.student_onnx), _pct(acc_b and acc_b.student_onnx), "%", "higher")
    add("accuracy (ONNX)", "teacher", _pct(acc_a and acc_a.teacher_onnx), _pct(acc_b and acc_b.teacher_onnx), "%", "higher")
    add("accuracy (ONNX)", "drop", acc_a and acc_a.drop_pt, acc_b and acc_b.drop_pt, "pt", "lower")
    add("accuracy (ONNX)", "samples", acc_a and acc_a.samples, acc_b and acc_b.samples, "count")
    for role in ("student", "teacher"):
        ma, mb_ = getattr(a, role), getattr(b, role)
        add(role, "model", ma and ma.name, mb_ and mb_.name)
        add(role, "parameters", ma and ma.params, mb_ and mb_.params, "count", "lower")
        add(role, "MACs", ma and ma.macs, mb_ and mb_.macs, "count", "lower")
        add(role, "ONNX size", ma and ma.size_bytes, mb_ and mb_.size_bytes, "bytes", "lower")
        add(role, "exporter / opset", ma and f"{ma.exporter} / {ma.opset}", mb_ and f"{mb_.exporter} / {mb_.opset}")
        # rounding-level differences (1e-7): informative, not better or worse
        add(role, "max abs diff", ma and ma.verification.max_abs_diff,
            mb_ and mb_.verification.max_abs_diff)
    for field in ("size", "macs", "params"):
        add("student / teacher", field, a.ratios and getattr(a.ratios, field),
            b.ratios and getattr(b.ratios, field), "x", "lower")
    providers = list(dict.fromkeys([*a.latency.onnxruntime, *b.latency.onnxruntime]))
    for prov in providers:
        section = f"latency {prov.replace('ExecutionProvider', '')} (median ms)"
        ta, tb = a.latency.table(prov), b.latency.table(prov)
        sizes = sorted({int(k) for t in (ta, tb) for m in t.values() for k in m})
        for bs in sizes:
            for role in ("student", "teacher"):
                sa, sb = ta.get(role, {}).get(str(bs)), tb.get(role, {}).get(str(bs))
                add(section, f"{role} @{bs}", sa and sa.median_ms, sb and sb.median_ms, "ms", "lower",
                    half_iqr(sa), half_iqr(sb))
            add(section, f"speed-up @{bs}", a.latency.speedup.get(prov, {}).get(str(bs)),
                b.latency.speedup.get(prov, {}).get(str(bs)), "x", "higher",
                speedup_spread(ta, bs), speedup_spread(tb, bs))
    add("gates", "failed", len(a.gates.failures), len(b.gates.failures), "", "lower")
    if a.gates.expressions != b.gates.expressions:
        add("gates", "expressions", "; ".join(a.gates.expressions) or DASH, "; ".join(b.gates.expressions) or DASH)
    for key in dict.fromkeys([*a.environment, *b.environment]):  # only what changed: context for latency
        if a.environment.get(key) != b.environment.get(key):
            add("environment", key, _text(a.environment.get(key)), _text(b.environment.get(key)))
    return rows


def _text(v) -> Optional[str]:
    return None if v is None else str(v)


def _compress_rows(a, b) -> list[DiffRow]:
    rows: list[DiffRow] = []

    def add(section, name, va, vb, unit="", better=None):
        if va is not None or vb is not None:
            rows.append(DiffRow(section, name, va, vb, unit, better))

    for role in ("teacher", "student"):
        ra, rb = getattr(a, role), getattr(b, role)
        add(role, "model", ra.model, rb.model)
        add(role, "parameters", ra.params, rb.params, "count", "lower" if role == "student" else None)
        add(role, "MACs", ra.macs, rb.macs, "count", "lower" if role == "student" else None)
        add(role, "val accuracy", _pct(ra.val_accuracy), _pct(rb.val_accuracy), "%", "higher")
        add(role, "test accuracy", _pct(ra.test_accuracy), _pct(rb.test_accuracy), "%", "higher")
    add("student", "MACs ratio", a.student.macs_ratio, b.student.macs_ratio, "x", "lower")
    add("student", "params ratio", a.student.params_ratio, b.student.params_ratio, "x", "lower")
    add("run", "steps", len(a.steps), len(b.steps), "count")
    add("run", "seconds", sum(s.seconds for s in a.steps), sum(s.seconds for s in b.steps), "s")  # the machine's, mostly
    add("run", "target met", a.target_met, b.target_met, "", "higher")
    add("run", "failed gates", len(a.gate_failures), len(b.gate_failures), "", "lower")
    if a.export is not None and b.export is not None:
        rows += _export_rows(a.export, b.export, prefix="export · ")
    elif (a.export is None) != (b.export is None):
        add("run", "exported", a.export is not None, b.export is not None)
    return rows


def _analysis_rows(a, b) -> list[DiffRow]:
    rows: list[DiffRow] = []

    def add(section, name, va, vb, unit="", better=None):
        if va is not None or vb is not None:
            rows.append(DiffRow(section, name, va, vb, unit, better))

    add("model", "name", a.model.name, b.model.name)
    add("model", "parameters", a.model.params, b.model.params, "count", "lower")
    add("model", "MACs", a.model.macs, b.model.macs, "count", "lower")
    add("model", "layers", len(a.layers), len(b.layers), "count")
    add("model", "prunable groups", len(a.groups), len(b.groups), "count")
    add("data", "samples", a.data and a.data.samples, b.data and b.data.samples, "count")
    add("data", "test accuracy", _pct(a.data and a.data.test_accuracy), _pct(b.data and b.data.test_accuracy),
        "%", "higher")
    for phase in dict.fromkeys([*a.timings, *b.timings]):
        add("seconds", phase, a.timings.get(phase), b.timings.get(phase), "s")  # the machine's, mostly
    return rows


_ROWS = {"export-report": _export_rows, "compress-report": _compress_rows, "analysis": _analysis_rows}


def _kind(report: BaseModel) -> str:
    return report.uri.split(":")[-2]  # urn:kdcli:schema:<name>:<version>


def diff_reports(a: BaseModel, b: BaseModel, a_name: str = "A", b_name: str = "B") -> ReportDiff:
    """The rows of two reports of the same kind; InputError when their kinds differ."""
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        raise InputError(f"{b_name}: a kdcli {b.what}, but {a_name} is a kdcli {a.what}; "
                         "report diff compares two reports of the same kind")
    return ReportDiff(ka, a_name, b_name, _ROWS[ka](a, b))


def diff_files(a: str | Path, b: str | Path) -> ReportDiff:
    """Read, validate and compare two report files (any one kind); InputError (one line naming
    the file) for a missing or invalid one."""
    return diff_reports(load_any(a), load_any(b), str(a), str(b))


# ---------------------------------------------------------------------------------- rendering

def _ms(x: float) -> str:
    """Milliseconds: three decimals, more (up to six) for the sub-0.1 ms latencies of small models."""
    if not x or math.isnan(x):
        return "0" if not x else "nan"
    return f"{x:.{min(6, max(3, 2 - math.floor(math.log10(abs(x)))))}f}"


def _fmt(v: Value, unit: str) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return {"%": lambda x: f"{x:.2f}%", "pt": lambda x: f"{x:.2f} pt", "ms": _ms, "x": ratio,
            "count": lambda x: count(int(x)) if float(x).is_integer() else f"{x:.4g}", "bytes": lambda x: mb(int(x)),
            "s": lambda x: f"{x:.1f} s"}.get(unit, lambda x: f"{x:.4g}")(v)


def _fmt_delta(row: DiffRow) -> str:
    d = row.delta
    if d is None or math.isnan(d):
        return ""
    if d == 0:
        return "0"
    sign = "+" if d > 0 else "−"
    mag = abs(d)
    body = {"%": f"{mag:.2f} pt", "pt": f"{mag:.2f} pt", "ms": _ms(mag), "x": f"{mag:.3f}×",
            "count": count(int(mag)) if float(mag).is_integer() else f"{mag:.4g}",
            "bytes": mb(int(mag)), "s": f"{mag:.1f} s"}.get(row.unit, f"{mag:.4g}")
    return sign + body


def _fmt_pct(row: DiffRow) -> str:
    p = row.pct
    return "" if p is None or math.isnan(p) or p == 0 else f"{'+' if p > 0 else '−'}{abs(p):.1f}%"


def _spread_note(row: DiffRow) -> str:
    if row.change != "noise" or row.band is None:
        return ""
    return f" (±{_ms(row.band) if row.unit == 'ms' else f'{row.band:.3f}'})"


_MARK = {"worse": "✗ worse", "better": "✓ better", "noise": "≈ noise", "changed": "changed", "": ""}
HEAD = ["section", "figure", "A", "B", "Δ", "Δ %", ""]


def _cells(row: DiffRow) -> list[str]:
    return [row.section, row.name, _fmt(row.a, row.unit), _fmt(row.b, row.unit), _fmt_delta(row), _fmt_pct(row),
            _MARK[row.change] + _spread_note(row)]


def render_markdown(diff: ReportDiff) -> str:
    """The diff as a GitHub-flavoured Markdown table (for a PR comment or a CI summary)."""
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    worse = len(diff.worse)
    out = [f"# kdcli report diff ({diff.kind})", "", f"A: `{diff.a}`  ", f"B: `{diff.b}`", "",
           f"{worse} figure{'s' if worse != 1 else ''} worse in B." if worse else "Nothing worse in B.", "",
           "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for row in diff.rows:
        cells = _cells(row)
        if row.change == "worse":
            cells[-1] = f"**{cells[-1]}**"
        out.append("| " + " | ".join(esc(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def render_table(diff: ReportDiff):
    """A rich Table for the terminal: worse rows in red, better in green, noise dimmed."""
    worse = len(diff.worse)
    table = Table(title=f"report diff ({diff.kind}): A → B", caption=f"A: {diff.a}\nB: {diff.b}\n"
                  + (f"{worse} worse in B" if worse else "nothing worse in B"))
    for col in HEAD[1:]:  # the section is a heading row, to leave the width to the figures
        table.add_column(col, justify="left" if col in ("figure", "") else "right")
    style = {"worse": "bold red", "better": "green", "noise": "dim", "changed": "yellow", "": ""}
    section = None
    for row in diff.rows:
        if row.section != section:
            section = row.section
            table.add_row(Text(section, style="bold"))
        cells = _cells(row)
        table.add_row("  " + cells[1], *cells[2:-1], Text(cells[-1], style=style[row.change]))
    return table


def render(diff: ReportDiff, fmt: str) -> Any:
    """``table`` → a rich renderable; ``markdown`` → str; ``json`` → a JSON-ready dict."""
    if fmt == "table":
        return render_table(diff)
    if fmt == "markdown":
        return render_markdown(diff)
    if fmt == "json":
        return diff.to_json()
    raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
