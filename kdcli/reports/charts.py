"""Small inline-SVG charts and a self-contained HTML page, shared by every kdcli HTML report.

Pure Python, no plotting library: each function returns an ``<svg>`` string that can be pasted
into ``html_page``. The page loads nothing from the network (inline CSS, no scripts, no fonts),
so a report opens offline and can be attached to a CI run as one file. All text is escaped.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

__all__ = ["line_chart", "bar_chart", "heatmap", "histogram", "html_page", "html_table"]

# Colour-blind-safe palette (Okabe & Ito 2008); series take colours in order.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

_W, _H = 640, 320                      # SVG canvas size in px
_ML, _MR, _MT, _MB = 64, 150, 34, 48   # margins: left (tick labels), right (legend), top (title), bottom


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(v: float) -> str:
    """A short tick label: 3 significant digits, SI suffixes for large numbers."""
    if v == 0:
        return "0"
    a = abs(v)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suf}"
    return f"{v:.3g}"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (steps of 1, 2 or 5 × 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)  # ticks enclose [lo, hi]
    ticks = [round(k * step, 12) for k in range(first, last + 1)]
    if len(ticks) < 2:
        ticks.append(ticks[-1] + step)
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten (and 2×, 5× when the range is narrow) within [lo, hi] for a log axis."""
    lo_e, hi_e = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1, 2, 5) if hi_e - lo_e <= 2 else (1,)
    ticks = [m * 10.0 ** e for e in range(lo_e, hi_e + 1) for m in mults]
    inside = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return inside or [lo, hi]


def _frame(title: str, body: list[str], *, height: int = _H, width: int = _W) -> str:
    head = (f'<svg width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" class="chart">'
            f'<title>{_esc(title)}</title>'
            f'<text x="{width / 2}" y="20" text-anchor="middle" class="ct">{_esc(title)}</text>')
    return head + "".join(body) + "</svg>"


def _legend(names: Sequence[str], x0: float, y0: float) -> list[str]:
    out = []
    for i, name in enumerate(names):
        y = y0 + 14 * i
        out.append(f'<rect x="{x0}" y="{y - 8}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
                   f'<text x="{x0 + 14}" y="{y + 1}" class="lg">{_esc(name)}</text>')
    return out


class _Axes:
    """Maps data to pixels inside the plot area and draws axes, grid lines and tick labels."""

    def __init__(self, xlo, xhi, ylo, yhi, *, log_x=False, x_ticks=None, y_max=None):
        self.log_x = log_x
        if log_x:
            self.xt = x_ticks or _log_ticks(xlo, xhi)
            self.xlo, self.xhi = min(xlo, self.xt[0]), max(xhi, self.xt[-1])
        else:
            self.xt = x_ticks or _nice_ticks(xlo, xhi)
            self.xlo, self.xhi = min(xlo, self.xt[0]), max(xhi, self.xt[-1])
        self.yt = _nice_ticks(ylo, yhi)
        if y_max is not None and self.yt[-1] > y_max >= yhi:  # a round tick past the cap: end at the cap
            self.yt = [t for t in self.yt if t < y_max] + [y_max]
        self.ylo, self.yhi = self.yt[0], self.yt[-1]
        if self.xhi == self.xlo:
            self.xhi = self.xlo + 1

    def px(self, x: float) -> float:
        if self.log_x:
            f = (math.log10(x) - math.log10(self.xlo)) / ((math.log10(self.xhi) - math.log10(self.xlo)) or 1)
        else:
            f = (x - self.xlo) / (self.xhi - self.xlo)
        return _ML + f * (_W - _ML - _MR)

    def py(self, y: float) -> float:
        f = (y - self.ylo) / ((self.yhi - self.ylo) or 1)
        return _H - _MB - f * (_H - _MT - _MB)

    def draw(self, x_label: str, y_label: str, *, x_tick_labels: dict | None = None) -> list[str]:
        out = [f'<line x1="{_ML}" y1="{_H - _MB}" x2="{_W - _MR}" y2="{_H - _MB}" class="ax"/>',
               f'<line x1="{_ML}" y1="{_MT}" x2="{_ML}" y2="{_H - _MB}" class="ax"/>']
        for t in self.yt:
            y = self.py(t)
            out.append(f'<line x1="{_ML}" y1="{y:.1f}" x2="{_W - _MR}" y2="{y:.1f}" class="gr"/>'
                       f'<text x="{_ML - 6}" y="{y + 4:.1f}" text-anchor="end" class="tk">{_esc(_fmt(t))}</text>')
        for t in self.xt:
            x = self.px(t)
            label = (x_tick_labels or {}).get(t, _fmt(t))
            out.append(f'<line x1="{x:.1f}" y1="{_H - _MB}" x2="{x:.1f}" y2="{_H - _MB + 4}" class="ax"/>'
                       f'<text x="{x:.1f}" y="{_H - _MB + 16}" text-anchor="middle" class="tk">{_esc(label)}</text>')
        out.append(f'<text x="{(_ML + _W - _MR) / 2}" y="{_H - 10}" text-anchor="middle" class="al">{_esc(x_label)}</text>'
                   f'<text x="14" y="{(_MT + _H - _MB) / 2}" text-anchor="middle" class="al" '
                   f'transform="rotate(-90 14 {(_MT + _H - _MB) / 2})">{_esc(y_label)}</text>')
        return out


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str, y_label: str,
               log_x: bool = False, y_max: float | None = None) -> str:
    """Line chart with markers: ``series`` maps a legend name to its (x, y) points.

    ``log_x`` puts x on a log10 axis (non-positive x values are then dropped). ``y_max`` caps the
    y axis where values cannot go higher (100 for a percentage): the padding above the highest
    point stops there. Returns an SVG string.
    """
    clean = {k: sorted((float(x), float(y)) for x, y in pts
                       if math.isfinite(x) and math.isfinite(y) and (x > 0 or not log_x))
             for k, pts in series.items()}
    pts = [p for v in clean.values() for p in v]
    if not pts:
        return _frame(title, [f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="tk">no data</text>'])
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 1.0
    # non-negative data (latency, accuracy) keeps a zero floor rather than a negative tick
    top = yhi + pad if y_max is None else max(min(yhi + pad, y_max), yhi)
    ax = _Axes(min(xs), max(xs), max(ylo - pad, 0.0) if ylo >= 0 else ylo - pad, top, log_x=log_x, y_max=y_max)
    body = ax.draw(x_label, y_label)
    for i, (name, p) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{ax.px(x):.1f},{ax.py(y):.1f}" for x, y in p)
        if len(p) > 1:
            body.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in p:
            body.append(f'<circle cx="{ax.px(x):.1f}" cy="{ax.py(y):.1f}" r="3" fill="{colour}">'
                        f'<title>{_esc(name)}: ({_esc(_fmt(x))}, {_esc(_fmt(y))})</title></circle>')
    body += _legend(list(clean), _W - _MR + 12, _MT + 8)
    return _frame(title, body)


def bar_chart(labels: Sequence[str], values_by_series: dict[str, list[float]], *, title: str, y_label: str) -> str:
    """Grouped bar chart: one group per label, one bar per series (``values_by_series[name][i]``)."""
    names = list(values_by_series)
    vals = [float(v) for vs in values_by_series.values() for v in vs if v is not None and math.isfinite(v)]
    lo, hi = min(vals + [0.0]), max(vals + [0.0])
    n = max(len(labels), 1)
    ax = _Axes(0, n, lo, hi if hi > lo else lo + 1, x_ticks=[i + 0.5 for i in range(n)])
    body = ax.draw("", y_label, x_tick_labels={i + 0.5: str(lab) for i, lab in enumerate(labels)})
    group = (_W - _ML - _MR) / n
    bw = group * 0.8 / max(len(names), 1)
    zero = ax.py(0.0)
    for j, name in enumerate(names):
        colour = PALETTE[j % len(PALETTE)]
        for i, v in enumerate(values_by_series[name][:n]):
            if v is None or not math.isfinite(v):
                continue
            x = _ML + i * group + group * 0.1 + j * bw
            y = ax.py(float(v))
            body.append(f'<rect x="{x:.1f}" y="{min(y, zero):.1f}" width="{bw * 0.95:.1f}" '
                        f'height="{abs(zero - y):.1f}" fill="{colour}"><title>{_esc(name)} · {_esc(labels[i])}: '
                        f'{_esc(_fmt(float(v)))}</title></rect>')
    if len(names) > 1:
        body += _legend(names, _W - _MR + 12, _MT + 8)
    return _frame(title, body)


def heatmap(matrix: list[list[float]], row_labels: Sequence[str], col_labels: Sequence[str], *, title: str,
            value_range: tuple[float, float] | None = None) -> str:
    """Heatmap of a rows × cols matrix on a white→blue scale, each cell labelled with its value.

    The scale spans the matrix's own minimum and maximum, or ``value_range`` where the values
    have a natural one (0 to 1 for weights that form a distribution, so that 0.48 against 0.52
    does not look like white against blue)."""
    rows, cols = len(matrix), max((len(r) for r in matrix), default=0)
    vals = [float(v) for r in matrix for v in r if v is not None and math.isfinite(v)]
    lo, hi = value_range if value_range is not None else (min(vals), max(vals)) if vals else (0.0, 1.0)
    left, top = 120, _MT + 6
    cell_w = max(18.0, min(60.0, (_W - left - 16) / max(cols, 1)))
    cell_h = max(14.0, min(30.0, 360 / max(rows, 1)))
    width = int(left + cell_w * cols + 16)
    height = int(top + cell_h * rows + 60)
    body = []
    for i, row in enumerate(matrix):
        y = top + i * cell_h
        body.append(f'<text x="{left - 6}" y="{y + cell_h / 2 + 4:.1f}" text-anchor="end" class="tk">'
                    f'{_esc(row_labels[i] if i < len(row_labels) else i)}</text>')
        for j, v in enumerate(row):
            x = left + j * cell_w
            ok = v is not None and math.isfinite(v)
            f = (float(v) - lo) / ((hi - lo) or 1) if ok else 0.0
            # interpolate white (255,255,255) -> #0072B2 (0,114,178)
            r, g, b = (round(255 + f * (c - 255)) for c in (0, 114, 178))
            fill = f"rgb({r},{g},{b})" if ok else "#ddd"
            txt = "#fff" if f > 0.55 else "#222"
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell_w:.1f}" height="{cell_h:.1f}" fill="{fill}" '
                        f'stroke="#fff"/>')
            if cell_w >= 30 and ok:
                body.append(f'<text x="{x + cell_w / 2:.1f}" y="{y + cell_h / 2 + 4:.1f}" text-anchor="middle" '
                            f'class="tk" style="fill:{txt}">{_esc(_fmt(float(v)))}</text>')
    for j in range(cols):
        x = left + j * cell_w + cell_w / 2
        y = top + rows * cell_h + 12
        lab = col_labels[j] if j < len(col_labels) else j
        body.append(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="end" class="tk" '
                    f'transform="rotate(-45 {x:.1f} {y:.1f})">{_esc(lab)}</text>')
    scale = f"scale: {_fmt(lo)} (white) → {_fmt(hi)} (blue)"
    body.append(f'<text x="{left}" y="{height - 6}" class="tk">{_esc(scale)}</text>')
    return _frame(title, body, height=height, width=max(width, 300, int(left + 6.5 * len(scale) + 16)))


def histogram(values: Sequence[float], bins: int, *, title: str) -> str:
    """Histogram of ``values`` in ``bins`` equal-width bins (counts on y)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    bins = max(int(bins), 1)
    if not vals:
        return _frame(title, [f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="tk">no data</text>'])
    lo, hi = min(vals), max(vals)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for v in vals:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    ax = _Axes(lo, lo + width * bins, 0, max(counts))
    body = ax.draw("value", "count")
    for i, c in enumerate(counts):
        x0, x1 = ax.px(lo + i * width), ax.px(lo + (i + 1) * width)
        y = ax.py(c)
        body.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" height="{ax.py(0) - y:.1f}" '
                    f'fill="{PALETTE[0]}"><title>[{_esc(_fmt(lo + i * width))}, {_esc(_fmt(lo + (i + 1) * width))}): '
                    f'{c}</title></rect>')
    return _frame(title, body)


def html_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An HTML ``<table>`` with escaped cells; numbers are right-aligned."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="n"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_esc(_fmt(v) if isinstance(v, float) else v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{border:1px solid #ddd;padding:.25rem .6rem}
th{background:#f4f6f8;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:1rem}svg.chart{background:#fff;border:1px solid #eee}
svg .ct{font-size:14px;font-weight:600}svg .tk{font-size:11px;fill:#444}svg .al{font-size:12px}
svg .lg{font-size:11px}svg .ax{stroke:#444;stroke-width:1}svg .gr{stroke:#e6e6e6;stroke-width:1}
.ok{color:#0a7d32}.fail{color:#b00020}code,pre{background:#f4f6f8;padding:.1rem .3rem}
"""


def html_page(title: str, body_html: str) -> str:
    """A complete, self-contained HTML document (inline CSS; no scripts, fonts or network loads)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
            f"<body><h1>{_esc(title)}</h1>\n{body_html}\n</body></html>\n")
