"""The per-layer accuracy report as PNG charts and one self-contained HTML page (PNGs inlined as base64,
inline CSS, no scripts, nothing fetched), from a calibrators.layer_report.LayerReport.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state), so rendering is safe to call from
library code and leaves no windows or global settings behind.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from calibrators.histogram import TensorStats
from calibrators.layer_report import LayerAccuracy, LayerReport
from trtbuild.core import ort as ort_core

HISTOGRAM_BINS = 128


@dataclass
class RenderedReport:
    html: str
    pngs: dict[str, bytes]  # file name -> PNG bytes (the same images the page embeds)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("nan")


def sqnr_chart(report: LayerReport) -> bytes:
    """SQNR alone and cumulative per layer in graph order, the worst layers marked."""
    fig = Figure(figsize=(11, 3.8))
    ax = fig.add_subplot()
    x = np.arange(len(report.layers))
    ax.plot(x, [_finite(la.sqnr_alone_db) for la in report.layers], "o-", ms=3, label="alone")
    ax.plot(x, [_finite(la.sqnr_cumulative_db) for la in report.layers], "s-", ms=3, label="cumulative")
    worst = {la.node for la in report.worst()}
    for i, la in enumerate(report.layers):
        if la.node in worst:
            ax.annotate(
                str(i), (i, _finite(la.sqnr_alone_db)), color="crimson", fontsize=8, ha="center", va="top"
            )
    ax.set_xlabel("quantized layer (graph order; worst five numbered in red)")
    ax.set_ylabel("SQNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def histogram_chart(layer: LayerAccuracy, stats: TensorStats) -> bytes:
    """Calibration histogram of |input| (log counts) with the Q/DQ's range drawn in."""
    counts, edges = stats.trt_histogram(HISTOGRAM_BINS)
    fig = Figure(figsize=(5.2, 3.2))
    ax = fig.add_subplot()
    ax.bar(edges[:-1], np.maximum(counts, 0.5), width=np.diff(edges), align="edge", color="steelblue")
    ax.set_yscale("log")
    if layer.range_lo is not None and layer.range_hi is not None:
        amax = max(abs(layer.range_lo), abs(layer.range_hi))
        clipped = "" if layer.clipped is None else f", {layer.clipped:.3%} clipped"
        ax.axvline(amax, color="crimson", lw=1.5, label=f"Q/DQ range |x| <= {amax:.4g}{clipped}")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"|{layer.input}| (calibration data)")
    ax.set_ylabel("count")
    ax.set_title(layer.node, fontsize=9)
    return _png(fig)


def png_name(index: int, layer: LayerAccuracy) -> str:
    return f"hist_{index:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', layer.node).strip('_')[:60]}.png"


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _db(value: float) -> str:
    return "exact" if math.isinf(value) and value > 0 else f"{value:.2f}"


_CSS = (
    "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(2),td:nth-child(3)"
    "{text-align:left}tr.worst{background:#fde8e8}.hist{display:inline-block;margin:0 1em 1em 0}"
)


def render(report: LayerReport, title: str, summary: Mapping[str, str] | None = None) -> RenderedReport:
    """The page and its PNGs; ``summary``: extra label -> text lines shown at the top (gate, samples)."""
    pngs = {"sqnr.png": sqnr_chart(report)}
    worst = report.worst()
    worst_names = {la.node for la in worst}
    hist_html = []
    for i, layer in enumerate(worst):
        stats = report.histograms.get(layer.input or "")
        if stats is None:
            continue
        name = png_name(i, layer)
        pngs[name] = histogram_chart(layer, stats)
        hist_html.append(f'<div class="hist">{_img(pngs[name], layer.node)}</div>')
    rows = []
    for i, la in enumerate(report.layers):
        amax = (
            "-"
            if la.range_lo is None or la.range_hi is None
            else f"{max(abs(la.range_lo), abs(la.range_hi)):.4g}"
        )
        clipped = "-" if la.clipped is None else f"{la.clipped:.3%}"
        rows.append(
            f'<tr class="{"worst" if la.node in worst_names else ""}">'
            f"<td>{i}</td><td>{html.escape(la.node)}</td>"
            f"<td>{html.escape(la.op_type)}</td><td>{_db(la.sqnr_alone_db)}</td>"
            f"<td>{_db(la.sqnr_cumulative_db)}</td><td>{amax}</td><td>{clipped}</td></tr>"
        )
    facts = {
        "layers": f"{len(report.layers)} quantized",
        "samples": f"{report.samples} held-out samples",
        "semantics": ort_core.describe(report.semantics),
        **(summary or {}),
    }
    worst_list = "".join(
        f"<li>{html.escape(la.node)} ({html.escape(la.op_type)}): {_db(la.sqnr_alone_db)} dB alone, "
        f"{_db(la.sqnr_cumulative_db)} dB cumulative</li>"
        for la in worst
    )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<ul>{"".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in facts.items())}</ul>
<p>SQNR of each quantized layer's output against FP32. <b>Alone</b>: only this layer quantized (its INT8
weights and input Q/DQ, fed FP32 inputs). <b>Cumulative</b>: every layer up to it quantized.</p>
{_img(pngs["sqnr.png"], "SQNR per layer")}
<h2>Worst layers (lowest SQNR alone)</h2>
<ol>{worst_list}</ol>
<p>Calibration histograms of their inputs' magnitudes; the red line is the range the Q/DQ represents.</p>
{"".join(hist_html)}
<h2>All quantized layers</h2>
<table><tr><th>#</th><th>layer</th><th>op</th><th>SQNR alone dB</th><th>SQNR cumulative dB</th>
<th>input amax</th><th>input clipped</th></tr>
{"".join(rows)}
</table>
</body></html>
"""
    return RenderedReport(page, pngs)
