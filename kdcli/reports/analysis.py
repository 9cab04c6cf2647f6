"""The outputs of ``kdcli analyze``: ``analysis.json``, ``sensitivity.csv``, ``granularity.json``,
the terminal tables and the self-contained ``report.html`` (see :mod:`kdcli.analyze.analysis` for the
figures, :mod:`kdcli.reports.analysis_model` for the typed model of ``analysis.json``)."""

from __future__ import annotations

from kdcli.config.importance import CRITERIA

import csv
import html
import io
from pathlib import Path

from kdcli.console import Reporter
from kdcli.files import atomic_write_json, atomic_write_text
from kdcli.reports.analysis_model import check_analysis
from kdcli.reports.charts import bar_chart, heatmap, histogram, html_page, html_table, line_chart
from kdcli.reports.format import pct

# ----------------------------------------------------------------------------- outputs


def sensitivity_csv(result: dict) -> str:
    """The scan as CSV: one row per (group, ratio) with columns group, ratio, accuracy, macs."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "ratio", "accuracy", "macs"])
    for g, rows in ((result.get("pruning_sensitivity") or {}).get("curves") or {}).items():
        for r in rows:
            w.writerow([g, r["ratio"], f"{r['accuracy']:.6f}", r["macs"]])
    return buf.getvalue()


def write_outputs(result: dict, out_dir: Path, granularity=None) -> list[Path]:
    """Write analysis.json and report.html, plus sensitivity.csv and granularity.json when the
    analysis had data; all atomically. Returns the paths written (also in ``result["files"]``).

    The result is first validated through :class:`kdcli.reports.analysis_model.AnalysisReport`
    (ReportShapeError naming the field, and nothing written, when it does not match)."""

    out_dir = Path(out_dir)
    scan = result.get("pruning_sensitivity") is not None
    files = [out_dir / "analysis.json", out_dir / "report.html"]
    files += [out_dir / "sensitivity.csv"] if scan else []
    files += [out_dir / "granularity.json"] if granularity is not None else []
    result["files"] = [p.name for p in files]
    report = check_analysis(result)
    if scan:
        atomic_write_text(out_dir / "sensitivity.csv", sensitivity_csv(result))
    if granularity is not None:
        granularity.save(out_dir / "granularity.json")
    atomic_write_json(out_dir / "analysis.json", report.to_json())
    atomic_write_text(out_dir / "report.html", report_html(result))
    return files


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(what, value) rows of the summary shown first in the terminal and the report."""
    m, layers = result["model"], result["layers"]
    top = max(layers, key=lambda r: r["macs"], default=None)
    rows = [("model", f"{m['name']}  input {'x'.join(map(str, m['input_shape']))}, {m['num_classes']} classes"),
            ("parameters", f"{m['params']:,}"), ("MACs", f"{m['macs']:,}"),
            ("layers", f"{len(layers)}" + (f"; most MACs: {top['name']} ({pct(top['macs_share'], 1)})" if top else "")),
            ("prunable groups", f"{len(result['groups'])}" + (f" ({len(result['notes'])} note(s))" if result["notes"] else ""))]
    d = result.get("data")
    if d is None:
        rows.append(("data", "none: static figures only (give --data or --recipe for the rest)"))
        return rows
    scan = result["pruning_sensitivity"]
    rows += [("data", f"{d['samples']} {d['split']} samples of {d['description']}")]
    if d.get("which"):
        rows.append(("judged on", d["which"]))
    if d.get("normalization"):
        rows.append(("normalisation", d["normalization"]))
    rows.append(("top-1 (baseline)", pct(scan["baseline_accuracy"])
                 + (f"; test part {pct(d['test_accuracy'])}" if d.get("test_accuracy") is not None else "")))
    act, red = result["activation_sensitivity"] or {}, result["redundancy"] or {}
    if act:
        n_crit, n_all = sum(a["critical_count"] for a in act.values()), sum(len(a["critical"]) for a in act.values())
        rows += [("critical features", f"{n_crit} of {n_all} in {', '.join(act)}"),
                 ("PCA: components for 95%", ", ".join(f"{p} {r['components']['0.95']}/{r['features']}"
                                                      for p, r in red.items()))]
    half = {g: min(c, key=lambda r: abs(r["ratio"] - 0.5))["accuracy"] for g, c in scan["curves"].items() if c}
    if half:
        lo, hi = min(half, key=half.get), max(half, key=half.get)
        rows.append(("most / least sensitive group", f"{lo} ({pct(half[lo])} at ~0.5) / {hi} ({pct(half[hi])})"
                     if half[lo] < half[hi] else f"all alike ({pct(half[lo])} at ~0.5)"))
    s = result["suggested_ratios"]
    verdict = "reached" if s["reached"] else "not reachable by these groups"
    rows.append((f"suggested ratios (MACs {s['target_macs']:g})",
                 f"predicted MACs {s['predicted_macs_fraction']:.3f} of now ({verdict}), top-1 "
                 f"{pct(s['predicted_accuracy'])}; " + (", ".join(f"{g} {r:g}" for g, r in s["ratios"].items()) or "none")))
    return rows


def render_terminal(result: dict, reporter: Reporter, details: bool = False) -> None:
    """Print the summary table, then (``details``) the per-layer, per-group and per-tapped-layer
    tables, through ``reporter`` (rich on a terminal, plain text in logs)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="kdcli analyze", show_header=False)
    t.add_column("")
    t.add_column("")
    for row in summary_rows(result):
        t.add_row(*row)
    reporter.print_renderable(t)
    for line in cluster_lines(result):
        reporter.info(escape(line))  # class names are the user's text, not rich markup
    for note in result["notes"]:
        reporter.info(f"note: {note}")
    if not details:
        return
    for title, headers, rows in detail_tables(result):
        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            table.add_row(*[f"{v:,}" if isinstance(v, int) else str(v) for v in r])
        reporter.print_renderable(table)


def cluster_lines(result: dict) -> list[str]:
    """One line per confusable class subset (Hinton et al. 2015, §5.3), e.g.
    ``confusable subset 1/3: T-shirt, Shirt``; none when the analysis found no clusters."""
    c = result.get("clusters")
    if not c:
        return []
    n = len(c["subset_names"])
    head = f"confusable classes ({c['cluster_on']} of predicted probabilities, {c['samples']} {c['split']} samples):"
    return [head] + [f"  subset {i + 1}/{n}: {', '.join(names)}" for i, names in enumerate(c["subset_names"])]


def detail_tables(result: dict) -> list[tuple[str, list[str], list[list]]]:
    """(title, headers, rows) of the per-layer, per-group and per-tapped-layer tables."""
    layers = [[r["name"], r["type"], "x".join(map(str, r["output_shape"])) or "–", r["params"], r["macs"],
               pct(r['macs_share'], 1)] for r in result["layers"]]
    out = [("layers", ["layer", "type", "output", "params", "MACs", "MACs share"], layers)]
    scan = result.get("pruning_sensitivity") or {}
    curves, ratios = scan.get("curves") or {}, result["settings"]["ratios"]
    suggested = (result.get("suggested_ratios") or {}).get("ratios", {})
    rows = []
    for g in result["groups"]:
        imp = g["importance"]
        apoz = imp.get("apoz")
        width = g["channels"] if g.get("unit", "channel") == "channel" else f"{g['channels']} {g['unit']}s"
        row = [g["name"], width, ", ".join(g["layers"]["in"]) or "–",
               "–" if not apoz else f"{100 * sum(apoz) / len(apoz):.1f}%"]
        row += [pct(p["accuracy"]) for p in curves.get(g["name"], [])]
        rows.append(row + ([f"{suggested.get(g['name'], 0):g}"] if curves else []))
    heads = ["group", "channels", "feeds", "APoZ"] + ([f"@{r:g}" for r in ratios] + ["suggested"] if curves else [])
    out.append(("prunable groups" + (": top-1 with the group alone pruned @ratio" if curves else ""), heads, rows))
    act, red = result.get("activation_sensitivity") or {}, result.get("redundancy") or {}
    if act:
        out.append(("tapped layers", ["layer", "features", "critical", "active (mean)", "PCA 90%", "PCA 95%", "PCA 99%"],
                    [[p, len(a["critical"]), a["critical_count"],
                      f"{100 * sum(a['active_fraction']) / max(len(a['active_fraction']), 1):.1f}%",
                      *[red[p]["components"][q] for q in ("0.9", "0.95", "0.99")]] for p, a in act.items()]))
    return out


# ----------------------------------------------------------------------------- report.html


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)] or [[]]


_HEATMAP_MAX_CLASSES = 40  # beyond this a K×K heatmap is unreadable and heavy; the table stays


def _clusters_html(c: dict | None) -> list[str]:
    """The "Confusable classes" section: the subsets and the class correlation heatmap, its rows
    and columns ordered by subset so that confusable classes form blocks on the diagonal."""

    if not c:
        return []
    parts = ["<h2>Confusable classes</h2>",
             f"<p>K-means on the columns of the {html.escape(c['cluster_on'])} matrix of the model's predicted "
             f"probabilities on {c['samples']} {html.escape(c['split'])} samples groups the classes it confuses "
             "(Hinton et al. 2015, §5.3: the class subsets of specialist models).</p>",
             html_table(["subset", "classes"], [[i + 1, ", ".join(s)] for i, s in enumerate(c["subset_names"])])]
    names, labels = c["class_names"], c["cluster_of_class"]
    if len(names) > _HEATMAP_MAX_CLASSES:
        return parts + [f"<p>{len(names)} classes: the correlation heatmap is shown for at most "
                        f"{_HEATMAP_MAX_CLASSES}.</p>"]
    order = sorted(range(len(names)), key=lambda k: (labels[k], k))
    grid = [[round(c["correlation"][i][j], 2) for j in order] for i in order]  # two decimals: the labels fit
    ticks = [names[k] for k in order]
    return parts + ['<div class="charts">', heatmap(grid, ticks, ticks, title="Class correlation of predicted "
                                                    "probabilities (ordered by subset)"), "</div>"]


def report_html(result: dict) -> str:
    """The self-contained HTML report (inline SVG charts from :mod:`kdcli.reports.charts`, no scripts):
    summary, MACs and parameters per layer, pruning-sensitivity curves and suggested ratios,
    importance histograms, the critical-feature map, PCA explained-variance curves and (with
    clusters) the confusable class subsets with their correlation heatmap."""

    m, tables = result["model"], detail_tables(result)
    parts = ["<h2>Summary</h2>", html_table(["figure", "value"], summary_rows(result))]
    parts += [f"<p>note: {html.escape(n)}</p>" for n in result["notes"]]

    weighted = [r for r in result["layers"] if r["type"] in ("Conv1d", "Conv2d", "Conv3d", "Linear")] or result["layers"]
    number = {r["name"]: i + 1 for i, r in enumerate(weighted)}
    labels = [str(i + 1) for i in range(len(weighted))]
    parts += ["<h2>MACs and parameters per layer</h2>",
              "<p>Convolution and linear layers, numbered in call order (the table below names them).</p>",
              '<div class="charts">',
              bar_chart(labels, {"MACs": [r["macs"] for r in weighted]}, title="MACs per layer", y_label="MACs"),
              bar_chart(labels, {"parameters": [r["params"] for r in weighted]}, title="Parameters per layer",
                        y_label="parameters"), "</div>"]
    _, heads, rows = tables[0]
    parts.append(html_table(["#"] + heads, [[number.get(r[0], ""), *r] for r in rows]))

    scan = result.get("pruning_sensitivity")
    if scan:
        curves = scan["curves"]
        parts += ["<h2>Pruning sensitivity</h2>",
                  f"<p>Each group pruned alone (lowest {scan['criterion']} first), top-1 on {scan['samples']} "
                  f"samples; baseline {pct(scan['baseline_accuracy'])}. Scan took {scan['seconds']:.1f} s.</p>",
                  '<div class="charts">']
        for i, names in enumerate(_chunks(list(curves), 6)):
            series = {g: [(0.0, 100 * scan["baseline_accuracy"])] + [(p["ratio"], 100 * p["accuracy"]) for p in curves[g]]
                      for g in names}
            parts.append(line_chart(series, title=f"Top-1 against pruning ratio ({i + 1})", x_label="ratio of channels pruned",
                                    y_label="top-1 (%)", y_max=100.0))
        parts.append("</div>")
        s = result["suggested_ratios"]
        parts.append(f"<p>Suggested ratios for MACs {s['target_macs']:g}: predicted MACs "
                     f"{s['predicted_macs_fraction']:.3f} of the model's, predicted top-1 {pct(s['predicted_accuracy'])} "
                     f"({html.escape(s['method'])}).</p>")
    title, heads, rows = tables[1]
    parts += [f"<h3>{html.escape(title[0].upper() + title[1:])}</h3>", html_table(heads, rows)]

    parts += ["<h2>Channel importance</h2>", "<p>Each channel's score divided by its group's mean, all groups.</p>",
              '<div class="charts">']
    constant = []
    for crit in (*CRITERIA, "apoz"):
        vals = [v for g in result["groups"] for v in g["importance"].get(crit, [])]
        name = crit + (" (fraction of zeros)" if crit == "apoz" else "")
        if vals and max(vals) - min(vals) > 1e-9:
            parts.append(histogram(vals, 20, title=name))
        elif vals:  # one value for every channel (e.g. BatchNorm scales at initialisation): no histogram
            constant.append(f"{name}: every channel scores {vals[0]:.4g}")
    parts.append("</div>")
    parts += [f"<p>{html.escape(c)}</p>" for c in constant]

    act = result.get("activation_sensitivity")
    if act:
        parts += ["<h2>Activation sensitivity: critical features</h2>",
                  "<p>Sensitivity in [0, 1] per feature, 16 features a row; critical features are listed below "
                  "each map (matched coarsely by granularity-weighted distillation).</p>", '<div class="charts">']
        for p, a in act.items():
            s = [round(v, 2) for v in a["sensitivity"][:512]]  # two decimals: the cell labels fit
            grid = [s[i:i + 16] for i in range(0, len(s), 16)]
            parts.append(heatmap(grid, [f"{i * 16}–{i * 16 + len(r) - 1}" for i, r in enumerate(grid)],
                                 [str(j) for j in range(16)], title=f"{p} ({len(a['sensitivity'])} features)"))
        parts.append("</div>")
        for p, a in act.items():
            crit = [str(i) for i, c in enumerate(a["critical"]) if c]
            parts.append(f"<p><b>{html.escape(p)}</b> critical: {', '.join(crit) or 'none'}</p>")
        red = result["redundancy"]
        series = {p: [(i + 1, 100 * v) for i, v in enumerate(r["cumulative"])] for p, r in red.items()}
        parts += ["<h2>Redundancy (PCA)</h2>", '<div class="charts">',
                  line_chart(series, title="Explained variance", x_label="principal components",
                             y_label="cumulative variance (%)"), "</div>"]
        parts.append(html_table(*tables[2][1:]))
    parts += _clusters_html(result.get("clusters"))
    return html_page(f"kdcli analyze: {m['name']}", "\n".join(parts))
